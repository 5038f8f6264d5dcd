#!/usr/bin/env bash
# A local multi-node Ray cluster on 127.0.0.1, for trying raymodule on "several machines" at home.
#
#   eval "$(cluster/local.sh start)"            # head + 1 worker node, 2 CPUs each
#   cluster/local.sh start --nodes 3 --cpus 1   # head + 3 worker nodes of 1 CPU
#   python jobs/train.py --workers 4            # joins the cluster through RAY_ADDRESS
#   ray job submit --working-dir . -- python jobs/train.py --workers 4
#   cluster/local.sh status
#   cluster/local.sh stop
#
# `start` prints `export` lines (RAY_ADDRESS and friends) on stdout and everything else on
# stderr, so `eval "$(cluster/local.sh start)"` sets up the shell it runs in.
#
# Everything stays on 127.0.0.1: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray register the
# nodes (and resolve "127.0.0.1" addresses) on loopback instead of the machine's network
# address. Clients need it too -- without it a driver given RAY_ADDRESS=127.0.0.1:PORT dials
# the machine's network address instead -- so `start` prints it with RAY_ADDRESS. Every port is
# explicit (a free one unless given), and the Ray temp dir is a short private /tmp/rmc-XXXX
# (Ray's unix socket paths must fit in 107 bytes), so this cluster neither collides with nor
# joins any other Ray on the machine.
#
# `stop` stops exactly what `start` started: each node is started in a session of its own, the
# state file records those session ids (and the PIDs they held after start), and `stop` signals
# the processes of those sessions by PID -- raylets, GCS, dashboard, agents and the worker
# processes the raylets forked (those get process groups of their own but keep the session):
# SIGTERM to all but the GCS, then to the GCS, then SIGKILL to whatever outlived the grace
# period. A session counts only while one of its processes names the cluster's temp dir, so a
# stale state file cannot make `stop` signal an unrelated session that reused the id. It never
# runs `ray stop`, which would stop every Ray on the machine.

set -euo pipefail

usage() {
    cat <<'EOF'
usage: cluster/local.sh start [--nodes N] [--head-cpus N] [--cpus N] [--port P]
                             [--dashboard-port P] [--object-store-mb M] [--state FILE]
       cluster/local.sh stop [--state FILE] [--grace SECONDS] [--keep-logs]
       cluster/local.sh status [--state FILE]

start  a head node and N worker nodes on 127.0.0.1
         --nodes N            worker nodes besides the head (default 1)
         --head-cpus N        CPUs the head offers to tasks and actors (default 2)
         --cpus N             CPUs each worker node offers (default 2)
         --port P             GCS port, i.e. RAY_ADDRESS=127.0.0.1:P (default: a free port)
         --dashboard-port P   dashboard and job API port (default: a free port)
         --object-store-mb M  object store size of each node (default 512)
stop   stop every process that `start` started (by PID), then delete its temp dir
         --grace SECONDS      wait for each SIGTERM round before SIGKILL (default 5)
         --keep-logs          keep the temp dir with the nodes' logs
status show the recorded cluster and how many of its processes are alive

--state FILE (or RAYMODULE_LOCAL_CLUSTER_STATE) is where the cluster is recorded; default
${TMPDIR:-/tmp}/raymodule-local-cluster-$UID.state. Several clusters can run at once with
different state files. PYTHON selects the interpreter Ray's processes run with (default:
python3 on the PATH); a `ray job submit` entrypoint's `python` is the one on the PATH.
EOF
}

log() { printf '%s\n' "$*" >&2; }
die() {
    log "cluster/local.sh: $*"
    exit 1
}

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
[[ -n "$PYTHON" ]] || die "no python3 on the PATH (set PYTHON)"

# Runs `ray start ARGS...` in a session of its own, writing the session id to SID_FILE first.
# "join" lifts, in this process only, the check that RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 puts on
# joining a second raylet, and keeps the node's own address on 127.0.0.1; the processes it
# starts inherit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and so stay on loopback too.
LAUNCHER='
import os, sys
mode, sid_file = sys.argv[1], sys.argv[2]
os.setsid()
with open(sid_file, "w") as f:
    f.write(str(os.getsid(0)))
if mode == "join":
    from ray._private import ray_constants, services
    ray_constants.ENABLE_RAY_CLUSTER = True
    services.get_node_ip_address = lambda *args, **kwargs: "127.0.0.1"
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[3:]]
main()
'

free_ports() { # free_ports N: N distinct ports that are free on 127.0.0.1 right now
    "$PYTHON" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# PIDs of the live (non-zombie) processes in the recorded sessions ($SESSIONS);
# `session_pids but-gcs` leaves out the GCS server, `session_pids zombies` adds the dead
# processes that their parent (init, for daemons) has not reaped yet.
session_pids() {
    [[ -n "$SESSIONS" ]] || return 0
    ps -eo pid=,sid=,stat=,comm= | awk -v sids=" $SESSIONS " -v but="${1:-}" \
        'index(sids, " " $2 " ") && ($3 !~ /^Z/ || but == "zombies") \
         && !(but == "but-gcs" && $4 == "gcs_server") { print $1 }'
}

# Narrows SESSIONS to the sessions that are still this cluster's: those holding a process whose
# command line names the cluster's temp dir. A recorded session whose processes are all gone is
# dropped, so a later, unrelated session that happens to reuse its id is never touched.
narrow_to_own_sessions() {
    [[ -n "$SESSIONS" && -n "$TEMP_DIR" ]] || return 0
    SESSIONS="$(ps -eo sid=,args= | awk -v sids=" $SESSIONS " -v dir="$TEMP_DIR/" \
        'index(sids, " " $1 " ") && index($0, dir) && !seen[$1]++ { printf "%s ", $1 }')"
    SESSIONS="${SESSIONS% }"
}

signal_and_wait() { # signal_and_wait SIGNAL SECONDS [but-gcs]: until those are gone or time is up
    local pids deadline=$((SECONDS + $2))
    pids="$(session_pids "${3:-}")"
    [[ -n "$pids" ]] || return 0
    # shellcheck disable=SC2086 # one PID per word
    kill -"$1" $pids 2>/dev/null || true
    while [[ -n "$(session_pids "${3:-}")" && $SECONDS -lt $deadline ]]; do sleep 0.2; done
}

STATE_KEYS=(TEMP_DIR RAY_ADDRESS DASHBOARD_URL NODES SESSIONS PIDS)
read_state() { # sets the STATE_KEYS variables from $STATE (no code from the file is run)
    local key value
    for key in "${STATE_KEYS[@]}"; do printf -v "$key" '%s' ""; done
    [[ -f "$STATE" ]] || return 1
    while IFS='=' read -r key value; do
        for k in "${STATE_KEYS[@]}"; do
            [[ "$key" == "$k" ]] && printf -v "$key" '%s' "$value"
        done
    done <"$STATE"
    return 0
}

write_state() {
    local tmp="$STATE.tmp.$$"
    {
        for key in "${STATE_KEYS[@]}"; do printf '%s=%s\n' "$key" "${!key}"; done
    } >"$tmp"
    mv -f "$tmp" "$STATE"
}

cmd_start() {
    local nodes=1 head_cpus=2 cpus=2 port="" dashboard_port="" object_store_mb=512
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --nodes) nodes="$2"; shift 2 ;;
            --head-cpus) head_cpus="$2"; shift 2 ;;
            --cpus) cpus="$2"; shift 2 ;;
            --port) port="$2"; shift 2 ;;
            --dashboard-port) dashboard_port="$2"; shift 2 ;;
            --object-store-mb) object_store_mb="$2"; shift 2 ;;
            --state) STATE="$2"; shift 2 ;;
            -h | --help) usage; exit 0 ;;
            *) die "start: unknown option $1 (see --help)" ;;
        esac
    done
    for value in "$nodes" "$head_cpus" "$cpus" "$object_store_mb" ${port:+"$port"} \
        ${dashboard_port:+"$dashboard_port"}; do
        [[ "$value" =~ ^[0-9]+$ ]] || die "start: expected a whole number, got '$value'"
    done

    if read_state && narrow_to_own_sessions && [[ -n "$SESSIONS" ]]; then
        die "a cluster recorded in $STATE is running ($RAY_ADDRESS); stop it first" \
            "(cluster/local.sh stop --state $STATE) or pass another --state"
    fi

    # Ray's own environment for every node; the processes a node starts inherit it.
    unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled \
        RAY_USAGE_STATS_ENABLED=0 GLOO_SOCKET_IFNAME=lo

    TEMP_DIR="$(mktemp -d /tmp/rmc-XXXX)"
    # the nodes' own temp files go there too, and leave with it: the dashboard starts its
    # modules through a multiprocessing forkserver, whose /tmp/pymp-* folder a stop left behind
    export TMPDIR="$TEMP_DIR"
    NODES=0 SESSIONS="" PIDS=""
    local ports
    read -r -a ports <<<"$(free_ports 2)"
    port="${port:-${ports[0]}}"
    dashboard_port="${dashboard_port:-${ports[1]}}"
    RAY_ADDRESS="127.0.0.1:$port"
    DASHBOARD_URL="http://127.0.0.1:$dashboard_port"
    write_state # from here on, `stop` can clean up whatever has started

    local object_store_bytes=$((object_store_mb * 1024 * 1024))
    start_node() { # start_node NAME head|join RAY-START-ARGS...
        local name="$1" mode="$2"
        shift 2
        local agent_listen agent_grpc metrics runtime_env node_manager object_manager
        read -r agent_listen agent_grpc metrics runtime_env node_manager object_manager \
            <<<"$(free_ports 6)"
        local sid_file="$TEMP_DIR/$name.sid" out="$TEMP_DIR/$name-start.log"
        local rc=0
        "$PYTHON" -c "$LAUNCHER" "$mode" "$sid_file" start "$@" \
            --node-ip-address=127.0.0.1 --temp-dir="$TEMP_DIR" \
            --object-store-memory="$object_store_bytes" \
            --dashboard-agent-listen-port="$agent_listen" \
            --dashboard-agent-grpc-port="$agent_grpc" --metrics-export-port="$metrics" \
            --runtime-env-agent-port="$runtime_env" --node-manager-port="$node_manager" \
            --object-manager-port="$object_manager" --min-worker-port=0 --max-worker-port=0 \
            --disable-usage-stats --log-style=record </dev/null >"$out" 2>&1 || rc=$?
        if [[ -s "$sid_file" ]]; then
            SESSIONS="${SESSIONS:+$SESSIONS }$(cat "$sid_file")"
            write_state
        fi
        if [[ $rc -ne 0 ]]; then
            log "ray start ($name) failed with exit code $rc:"
            tail -n 20 "$out" >&2
            log "stopping what was started"
            cmd_stop --state "$STATE" --keep-logs >&2 || true
            log "logs kept in $TEMP_DIR"
            exit 1
        fi
        NODES=$((NODES + 1))
        write_state
    }

    log "starting a Ray head on $RAY_ADDRESS (dashboard $DASHBOARD_URL, $head_cpus CPUs)"
    start_node head head --head --port="$port" --num-cpus="$head_cpus" \
        --include-dashboard=true --dashboard-host=127.0.0.1 \
        --dashboard-port="$dashboard_port" --ray-client-server-port="$(free_ports 1)"
    for ((i = 1; i <= nodes; i++)); do
        log "starting worker node $i of $nodes ($cpus CPUs)"
        start_node "worker$i" join --address="$RAY_ADDRESS" --num-cpus="$cpus"
    done
    # shellcheck disable=SC2034 # written to the state file through ${!key}
    PIDS="$(session_pids | tr '\n' ' ' | sed 's/ $//')"
    write_state

    cat <<EOF
export RAY_ADDRESS=$RAY_ADDRESS
export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
# dashboard: $DASHBOARD_URL
EOF
    log ""
    log "Ray cluster on 127.0.0.1: head + $nodes worker node(s), $((head_cpus + nodes * cpus)) CPUs"
    log "  RAY_ADDRESS=$RAY_ADDRESS   (export the lines above, or: eval \"\$(cluster/local.sh start)\")"
    log "  dashboard:  $DASHBOARD_URL"
    log "  submit:     ray job submit --address $DASHBOARD_URL --working-dir . -- python jobs/train.py"
    log "  logs:       $TEMP_DIR/session_latest/logs"
    log "  stop:       cluster/local.sh stop${STATE_GIVEN:+ --state $STATE}"
}

cmd_stop() {
    local grace=5 keep_logs=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --state) STATE="$2"; shift 2 ;;
            --grace) grace="$2"; shift 2 ;;
            --keep-logs) keep_logs=1; shift ;;
            -h | --help) usage; exit 0 ;;
            *) die "stop: unknown option $1 (see --help)" ;;
        esac
    done
    [[ "$grace" =~ ^[0-9]+$ ]] || die "stop: --grace expects whole seconds, got '$grace'"
    if ! read_state; then
        log "no cluster recorded in $STATE: nothing to stop"
        return 0
    fi
    narrow_to_own_sessions # from here on, only these sessions' processes are signalled
    local pids
    pids="$(session_pids)"
    if [[ -n "$pids" ]]; then
        log "stopping $(wc -w <<<"$pids") processes of the cluster at $RAY_ADDRESS"
        # The GCS last: raylets and agents shut down cleanly (in about a second) while it is
        # still there to talk to, and it then exits at once; terminated together, the GCS can
        # hang on exit. SIGKILL for whatever outlives the grace period.
        signal_and_wait TERM "$grace" but-gcs
        signal_and_wait TERM "$grace"
        pids="$(session_pids)"
        if [[ -n "$pids" ]]; then
            log "still running after SIGTERM, killing: $(tr '\n' ' ' <<<"$pids")"
            signal_and_wait KILL 10
        fi
    fi
    pids="$(session_pids)"
    [[ -z "$pids" ]] || die "could not stop: $(tr '\n' ' ' <<<"$pids")"
    local deadline=$((SECONDS + 5)) # the killed processes leave the process table once reaped
    while [[ -n "$(session_pids zombies)" && $SECONDS -lt $deadline ]]; do sleep 0.2; done
    # Only a temp dir this script made (/tmp/rmc-XXXX) is ever deleted.
    if [[ -z "$keep_logs" && "$TEMP_DIR" =~ ^/tmp/rmc-[A-Za-z0-9]{4}$ ]]; then
        rm -rf -- "$TEMP_DIR"
    fi
    rm -f -- "$STATE"
    log "stopped the cluster at $RAY_ADDRESS"
}

cmd_status() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --state) STATE="$2"; shift 2 ;;
            -h | --help) usage; exit 0 ;;
            *) die "status: unknown option $1 (see --help)" ;;
        esac
    done
    if ! read_state; then
        echo "no cluster recorded in $STATE"
        return 1
    fi
    narrow_to_own_sessions
    local alive
    alive="$(session_pids | wc -l)"
    echo "RAY_ADDRESS=$RAY_ADDRESS"
    echo "dashboard: $DASHBOARD_URL"
    echo "nodes started: $NODES; processes alive: $alive"
    echo "logs: $TEMP_DIR/session_latest/logs"
    [[ "$alive" -gt 0 ]]
}

STATE_GIVEN="${RAYMODULE_LOCAL_CLUSTER_STATE:-}"
STATE="${RAYMODULE_LOCAL_CLUSTER_STATE:-${TMPDIR:-/tmp}/raymodule-local-cluster-$UID.state}"
command="${1:-}"
[[ $# -gt 0 ]] && shift
for arg in "$@"; do [[ "$arg" == --state ]] && STATE_GIVEN=1; done
case "$command" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
