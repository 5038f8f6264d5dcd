"""jobs/scaling.py's model: fitted to measurements made from known terms, it finds those
terms again, predicts the runs it was not fitted to, and reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import scaling  # noqa: E402

TERMS = {
    "a_s": 20e-6,
    "b_s": 0.1e-9,
    "a_g": 300e-6,
    "b_g": 0.7e-9,
    "o1": 1.5e-3,
    "g0": 1.2e-3,
    "g1": 0.6,
    "w": 0.8e-3,
}
COMPUTE = {"mlp": (1.4e-3, 0.0125e-3), "lenet": (0.9e-3, 0.16e-3), "resnet50": (0.09, 0.105)}


def measurements(cores: int = 2) -> dict:
    """What measure() would give on a machine of ``cores`` cores that behaves exactly as the
    model."""
    t = TERMS
    m = {
        "format": scaling.FORMAT,
        "cores": cores,
        # one bucket of 2 ranks, read where summed: a copy in, the sum (1.5 B)
        "shm": {n: {"s": 2 * t["a_s"] + t["b_s"] * n * 2.5} for n in scaling.SIZES},
        "gloo": {n: {"s": 2 * t["a_g"] + t["b_g"] * n} for n in scaling.SIZES},
        "compute_s": {
            model: {b: c0 + c1 * b for b in ([1, 2] if model == "resnet50" else [16, 32, 64])}
            for model, (c0, c1) in COMPUTE.items()
        },
    }
    nbytes = scaling.gradient_bytes()["mlp"]
    assert scaling.buckets(nbytes) == 1  # read where summed (RAYMODULE_ALLREDUCE_BUCKET_BYTES)
    m["tiers"], m["runs"] = {}, {}
    for w, k in scaling.LAYOUTS:
        node = 0.0
        if w // k > 1:
            n = w // k
            node = (2 * t["a_s"] + t["b_s"] * nbytes * (1 + (n + 1) / n)) * max(1, w / cores)
        net = 2 * (k - 1) * t["a_g"] + 2 * (k - 1) / k * nbytes * t["b_g"] if k > 1 else 0.0
        x = node + net + (t["w"] if w // k > cores else 0.0)  # a node's ranks outnumber them
        if w > 1:
            m["tiers"][f"{w}x{k}"] = {"s": x, "tiers": {"shared memory": node, "gloo": net}}
        og = t["g0"] + t["g1"] * x if w > 1 else 0.0
        own = COMPUTE["mlp"][0] + COMPUTE["mlp"][1] * 128 / w + t["o1"] + og
        step = max(1, w / cores) * own + x
        used = {"worker": 0.5, "client": 0.1, "controller": 0.05}
        m["runs"][f"{w}x{k}"] = {"samples_per_s": 128 / step, "cores": used}
    return m


@pytest.mark.parametrize("cores", [1, 2])  # on 1 core, 2 workers share it too
def test_the_model_finds_the_terms_it_was_measured_with_and_predicts_the_other_runs(cores):
    measured = measurements(cores)
    model = scaling.Model(json.loads(json.dumps(measured)))  # as --from-json reads it
    for name, value in TERMS.items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6), name
    for name, terms in COMPUTE.items():
        assert model.compute[name] == pytest.approx(terms, rel=1e-6)
    for w, k in scaling.LAYOUTS:
        expected = 128 / measured["runs"][f"{w}x{k}"]["samples_per_s"]
        assert model.step("mlp", w, k) == pytest.approx(expected, rel=1e-6)
    # a gradient of 4 of the workers' buckets: 4 sums' fixed costs, and a copy out too
    big = 4 * scaling.SETTINGS.allreduce_bucket_bytes
    node = 2 * TERMS["a_s"] * 4 + TERMS["b_s"] * big * (2 + 3 / 2)
    assert model.node(2, big) == pytest.approx(node, rel=1e-6)
    net = 2 * 7 * TERMS["a_g"] * 4 + 2 * 7 / 8 * big * TERMS["b_g"]
    assert model.net(8, big) == pytest.approx(net, rel=1e-6)
    # weak scaling of the mlp (one bucket) on nodes of 8 workers with a core each, 10 Gb/s links
    # (slower than loopback's b_g here): no s(W) and no w
    nbytes = scaling.gradient_bytes()["mlp"]
    alone = COMPUTE["mlp"][0] + COMPUTE["mlp"][1] * 64 + TERMS["o1"]
    for workers, nodes in ((8, 1), (64, 8)):
        x = 2 * TERMS["a_s"] + TERMS["b_s"] * nbytes * (1 + 9 / 8)
        if nodes > 1:
            x += 2 * (nodes - 1) * TERMS["a_g"] + 2 * (nodes - 1) / nodes * nbytes * 0.8e-9
        expected = alone / (alone + TERMS["g0"] + TERMS["g1"] * x + x)
        assert model.efficiency("mlp", 64, workers, 8, 10) == pytest.approx(expected, rel=1e-6)


def test_measurements_of_an_older_format_are_refused_in_words():
    old = measurements()
    del old["format"]  # written before the sums were timed as the workers sum
    with pytest.raises(ValueError, match="format 1, not 2.*measure again"):
        scaling.Model(old)


def test_the_report_from_saved_measurements_gives_every_table(tmp_path):
    saved = tmp_path / "m.json"
    m = measurements()
    rate = m["runs"]["4x1"]["samples_per_s"]
    m["runs"]["4x1"]["each"] = [0.9 * rate, rate]  # --repeats 2: the median is the lower
    saved.write_text(json.dumps(m))
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "scaling.py"), "--from-json", str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = out.stdout.splitlines()
    for layout in ("4 on 1", "4 on 2"):  # predicted, and exactly: the data is the model's
        row = next(r for r in rows if r.lstrip().startswith(layout) and "predicted" in r)
        assert "+0%" in row or "-0%" in row, row
    row = next(r for r in rows if r.lstrip().startswith("4 on 1") and "predicted" in r)
    assert f"{0.9 * rate:,.0f}-{rate:,.0f}" in row, row  # the range of the runs
    assert any(r.split()[:1] == ["resnet50"] for r in rows)
    assert "8 workers  64 workers  512 workers" in out.stdout
