"""An elastic run on a cluster that Ray's own autoscaler grows (fake multi-node provider, real
raylets on 127.0.0.1). The scenario runs in a process of its own (tests/autoscaling_cluster.py),
which starts and stops its cluster: a process holds one Ray, and the session's is local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_a_run_starts_on_the_node_there_is_and_grows_as_the_autoscaler_adds_nodes(tmp_path):
    """``raymodule.workers(1, max_workers=3)`` on a cluster with one 1-CPU worker node: training
    starts at once on it; the two workers still asking for a CPU make the autoscaler add two
    nodes, and they join at a step boundary. Then one of those nodes is drained (Ray's drain
    API, as the autoscaler calls it): its worker leaves at a step boundary, with no failed step.
    The run ends on two workers with the model plain MXNet trains on the same batches on one
    device."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "autoscaling_cluster.py"), str(out)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    log = proc.stdout + proc.stderr
    assert result["fired"] == [1, 1], result.get("error") or log[-3000:]
    assert result["error"] is None, result["error"]
    assert result["nodes_at_start"] == 1 and result["nodes_at_end"] >= 2  # one is draining
    assert "started with 1 of 3 workers" in log
    assert result["replicas_equal"]
    assert result["diff"] <= 1e-4, f"differs from plain MXNet by {result['diff']:.2e}"
    changes = [m for m in result["metrics"] if m.get("change") not in (None, "re-formed")]
    grown, drained = changes[:-1], changes[-1]
    assert grown and all(m["change"] == "grown" for m in grown), changes
    assert grown[0]["previous_world_size"] == 1 and grown[-1]["world_size"] == 3
    assert drained["change"] == "drained" and drained["left"] == ["slot 1"], drained
    assert drained["world_size"] == 2 and drained["failures"] == 0
    assert result["world_size"] == 2
    epochs = [m for m in result["metrics"] if "epoch" in m]
    assert epochs[-1]["world_size"] == 2
