"""benchmarks/gpu.sh, the one command for a lent GPU, run end to end at its tiny CPU sizes (DEVICE=cpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_script_runs_every_step_on_cpu_and_writes_results(tmp_path):
    environment = {
        **os.environ,
        "DEVICE": "cpu",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("gpu-cpu-")
    summary = (folder / "summary.md").read_text()
    assert "torch " in summary and "failed" not in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "| ok" in line]
    steps = [row.split(" | ")[0][2:] for row in rows]
    plan = json.loads((folder / "plan.json").read_text())
    assert [entry["mode"] for entry in plan["modes"]] == ["false", "true", "max"]  # a real step each, below
    assert steps == [
        "cuda-tests",
        "bench-densenet_bc_10_k12-fp32",
        "bench-densenet_bc_10_k12-bf16",
        "bench-densenet121_3d-fp32",  # on CPU no bf16 row for volumes: 3D pooling has no bf16 CPU kernel
        "bench-densenet_bc_10_k12-optimizer-in-backward",
        "plan",
        *[f"largest-batch-{entry['mode']}-{entry['largest_batch']}" for entry in plan["modes"]],
        "bench-densenet_bc_10_k12-compiled",  # last: on CUDA inductor's compiles take minutes
    ]
    compiled = json.loads((folder / "bench-densenet_bc_10_k12-compiled.json").read_text())["rows"]
    assert [row["label"] for row in compiled if "compile" in row["label"]] == [
        "torch.compile, efficient=False",
        "torch.compile, efficient='max'",
    ]
    fused = json.loads((folder / "bench-densenet_bc_10_k12-optimizer-in-backward.json").read_text())
    assert "optimizer step in backward" in fused["summary"]
    for entry in plan["modes"]:
        checked = json.loads((folder / f"largest-batch-{entry['mode']}.json").read_text())["rows"][0]
        assert checked["batch_size"] == entry["largest_batch"] > 0 and checked["peak_bytes"] > 0


@pytest.mark.slow
def test_gpu_script_records_a_step_past_its_time_limit_and_goes_on(tmp_path):
    environment = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable, "LIMIT": "1"}
    done = subprocess.run(["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    summary = next(tmp_path.iterdir()).joinpath("summary.md").read_text()
    rows = [line.split(" | ") for line in summary.splitlines() if line.startswith("| ") and ".txt |" in line]
    assert [row[0][2:] for row in rows][-2:] == ["plan", "bench-densenet_bc_10_k12-compiled"]  # no largest batch
    assert len(rows) == 7 and all(row[2] == "failed (124)" for row in rows), summary
    assert "Total:" in summary
