"""benchmarks/gpu.py --tiny: the GPU call's code, at tiny shapes on the CPU, so it cannot rot unseen."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")  # the parity and training sections compare against it


def test_tiny_run_writes_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--out", str(out),
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu

    report = json.loads((out / "gpu.json").read_text())
    assert list(report["sections"]) == list(gpu.SECTIONS)
    for name, record in report["sections"].items():
        assert record["status"] == "ok", (name, record.get("error"))
        numbers = gpu.finite_numbers(record["results"])
        assert numbers and all(math.isfinite(x) for x in numbers), name
    s = {name: r["results"] for name, r in report["sections"].items()}
    # The figures the GPU call exists for, each present.
    assert s["hardware"]["copy_bandwidth_GBps"] > 0
    assert s["parity"]["float32"]["max_abs_logit_error"] < 1e-3
    assert s["parity"]["bfloat16"]["max_abs_logit_error"] < 0.1
    assert [r["variant"] for r in s["sinkhorn"]["rows"]] == ["eager", "compiled"]
    assert all(s["sinkhorn"]["real_like"][m]["converged"] for m in ("eager", "compiled"))
    assert s["grow"]["returncode"] == 0 and s["grow"]["seconds"] > 0 and s["grow"]["peak_rss_bytes"] > 0
    groups = {(g["setting"], g["mode"]) for g in s["train"]["groups"] if "ours" in g and "transformers" in g}
    assert groups == {(a, b) for a in ("new layers", "all layers") for b in ("eager", "compiled")}
    assert set(s["study"]["final_loss"]) == {"opt-paper", "avg-zero", "llama-pro"}
    assert s["study"]["reproducibility"]["python"] and len(s["study"]["reproducibility"]["corpus_sha256"]) == 64
    # Every target has a measured value, and the Markdown carries the device and bandwidth line.
    assert report["targets"] and all(t["value"] is not None for t in report["targets"])
    assert "copy bandwidth" in (out / "gpu.md").read_text()
