"""The benchmark, the memory planner and the CPU memory counter they rest on, on tiny configurations."""

import csv
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from densenet_efficient.tools import bench, common, plan
from densenet_efficient.tools.cli import main
from densenet_efficient.tools.memory import LiveTensorBytes, fake_footprint, saved_tensor_bytes

TINY = ["--model", "densenet_bc_10_k12", "--batch-size", "4", "--input-size", "16"]
TINY_SETTING = bench.Setting(torch.device("cpu"), batch_size=4, input_size=16, repeats=1)


# ----------------------------------------------------------------------------------------------- the counter


def test_counter_counts_a_single_allocation_and_its_release():
    with LiveTensorBytes() as counter:
        tensor = torch.empty(1000, dtype=torch.float32)
        assert (counter.current, counter.peak) == (4000, 4000)
        del tensor
        assert (counter.current, counter.peak) == (0, 4000)


def test_counter_ignores_tensors_allocated_before_it():
    existing = torch.zeros(1000)
    with LiveTensorBytes() as counter:
        existing.add_(1)
        view = existing[:10]
        view.mul_(2)
    assert counter.peak == 0


def test_counter_on_a_linear_layer_forward():
    layer = torch.nn.Linear(100, 50)
    x = torch.randn(32, 100)
    with LiveTensorBytes() as counter:
        out = torch.relu(layer(x))
    # linear's output and relu's output are alive together, then only relu's output
    assert (counter.peak, counter.current) == (2 * out.nbytes, out.nbytes)


def test_saved_activations_of_a_linear_layer():
    layer = torch.nn.Linear(100, 50)
    x = torch.randn(32, 100)
    with saved_tensor_bytes(exclude=tuple(layer.parameters())) as saved:
        out = torch.relu(layer(x))
    # addmm saves its input (the weight is excluded), relu saves its output
    assert saved.bytes == x.nbytes + out.nbytes


def test_fake_footprint_equals_the_real_count():
    def setup():
        model = common.build_model("densenet_bc_10_k12", True)
        return model, common.random_batch(4, 16, 3, 10)

    def step(model, batch):
        common.train_step(model, *batch, None)

    model, batch = setup()
    with LiveTensorBytes() as counter:
        step(model, batch)
    predicted = fake_footprint(setup, step)
    assert predicted.peak == counter.peak > 0
    assert predicted.parameters == sum(p.nbytes for p in model.parameters())
    assert predicted.buffers == sum(b.nbytes for b in model.buffers())


# ----------------------------------------------------------------------------------------------- peers


def test_checkpoint_baseline_computes_what_the_naive_model_computes():
    images, labels = common.random_batch(3, 16, 3, 10)
    grads = []
    for build in (lambda: common.build_model("densenet_bc_10_k12", False),
                  lambda: bench.checkpointed_densenet("densenet_bc_10_k12")):
        torch.manual_seed(0)
        model = build()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_naive, grads_naive), (loss_checkpoint, grads_checkpoint) = grads
    torch.testing.assert_close(loss_checkpoint, loss_naive)
    for got, expected in zip(grads_checkpoint, grads_naive):
        torch.testing.assert_close(got, expected)


def test_baseline_is_torchvision_for_imagenet_models_and_checkpoint_for_cifar():
    imagenet = bench.baseline_peer("densenet121_efficient")
    assert "torchvision" in imagenet.label
    with torch.device("meta"):
        theirs = imagenet.build()
        ours = common.build_model("densenet121_efficient", True)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 7_978_856
    assert "checkpoint" in bench.baseline_peer("densenet_bc_100_k12").label


def test_measured_cpu_peak_is_the_planners_prediction():
    rows = bench.measure("densenet_bc_10_k12", TINY_SETTING, ("true", "max"))
    for row in rows:
        predicted = plan.predict(bench.make_peers("densenet_bc_10_k12", (row["mode"],))[0].build, 4, 16)
        assert abs(predicted.peak - row["peak_bytes"]) <= 0.1 * row["peak_bytes"]


def test_peer_that_would_not_fit_is_skipped_with_its_prediction(monkeypatch):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 0)
    rows = bench.measure("densenet_bc_10_k12", TINY_SETTING, ("false", "max"))
    assert [row["skipped"] for row in rows] == [True, True]
    assert all(row["predicted_bytes"] > 0 and "peak_bytes" not in row for row in rows)
    assert "skipped" in bench.format_table(rows)


# ----------------------------------------------------------------------------------------------- bench command


def test_bench_writes_table_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    assert main(["bench", *TINY, "--repeats", "2", "--json", str(json_path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert "counted in-process by a TorchDispatchMode" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | peak memory (MiB) | memory x naive | step (s) | time x naive | images/s")
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| efficient=False", "| efficient=True", "| efficient='max'", "| torch.utils.checkpoint (gpleiss/efficient_densenet_pytorch)"]

    rows = json.loads(json_path.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["false", "true", "max", "checkpoint"]
    naive = rows[0]
    assert naive["memory_ratio"] == naive["time_ratio"] == 1.0
    assert naive["peak_bytes"] == naive["predicted_bytes"]
    for row in rows:
        assert len(row["step_times"]) == 2 and row["step_s"] > 0
        assert row["images_per_s"] == pytest.approx(4 / row["step_s"])
        assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / naive["peak_bytes"])
    assert rows[1]["peak_bytes"] < naive["peak_bytes"] and rows[2]["peak_bytes"] < naive["peak_bytes"]

    with open(csv_path, newline="") as file:
        records = list(csv.DictReader(file))
    assert [record["mode"] for record in records] == ["false", "true", "max", "checkpoint"]
    assert [int(record["peak_bytes"]) for record in records] == [row["peak_bytes"] for row in rows]


def test_depth_sweep_writes_a_plot_of_memory_growing_with_depth(tmp_path, capsys):
    png, json_path = tmp_path / "depth.png", tmp_path / "depth.json"
    args = ["bench", *TINY, "--repeats", "0", "--sweep", "depth", "--depths", "10,16",
            "--modes", "false,max", "--plot", str(png), "--json", str(json_path)]
    assert main(args) == 0
    assert "| depth | mode |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(json_path.read_text())["rows"]
    for mode in ("false", "max"):
        peaks = [row["peak_bytes"] for row in rows if row["mode"] == mode]
        assert len(peaks) == 2 and peaks[0] < peaks[1]


def test_batch_sweep_memory_is_affine_in_batch(tmp_path):
    json_path = tmp_path / "batch.json"
    args = ["bench", *TINY, "--repeats", "0", "--sweep", "batch", "--batch-sizes", "8,16,24", "--modes", "true",
            "--plot", str(tmp_path / "batch.png"), "--json", str(json_path)]
    assert main(args) == 0
    peaks = [row["peak_bytes"] for row in json.loads(json_path.read_text())["rows"]]
    assert peaks[1] - peaks[0] == peaks[2] - peaks[1] > 0
    assert (tmp_path / "batch.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--model", "densenet_bc_99_k12"], "6n+4"),
    (["--model", "resnet50"], "Available models"),
    (["--dtype", "fp8"], "fp32"),
    (["--device", "tpu"], "valid here: cpu"),
    (["--modes", "false,fast"], "choose from false, true, max, checkpoint"),
    (["--sweep", "depth", "--depths", "10,41"], "6n+4"),
    (["--input-size", "2"], "needs at least 4"),
    (["--batch-size", "0"], "integer >= 1"),
    (["--repeats", "-1"], "integer >= 0"),
])
def test_bench_rejects_bad_input_saying_what_is_valid(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        exit_code = main(["bench", *args])
        raise SystemExit(exit_code)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_and_plan_keep_heavy_imports_lazy():
    code = ("import sys, densenet_efficient.tools.bench, densenet_efficient.tools.plan; "
            "print([m for m in ('matplotlib', 'torchvision') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- planner


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("24GB", 24 * 10**9), ("512 MiB", 512 * 2**20), ("1.5gib", 3 * 2**29), ("100B", 100),
])
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16", "lots", "-1GiB", "0GB", "16XB"])
def test_parse_memory_rejects_bad_sizes(text):
    with pytest.raises(Exception, match="KiB, MiB, GiB, TiB"):
        plan.parse_memory(text)


def test_plan_largest_batch_is_the_boundary(tmp_path, capsys):
    json_path = tmp_path / "plan.json"
    assert main(["plan", "--memory", "8MiB", *TINY, "--modes", "false,max", "--json", str(json_path)]) == 0
    assert "largest batch" in capsys.readouterr().out
    result = json.loads(json_path.read_text())
    question = plan.Question(4, 16)
    for row in result["modes"]:
        build = bench.make_peers("densenet_bc_10_k12", (row["mode"],))[0].build
        batch = row["largest_batch"]
        assert batch > 4
        assert question.total(build, batch) <= 8 * 2**20 < question.total(build, batch + 1)
    naive, most = result["modes"]
    assert most["largest_batch"] > naive["largest_batch"]


def test_plan_deepest_by_search_is_the_boundary():
    question = plan.Question(2, 16)
    budget = 8 * 2**20
    found = plan.deepest("densenet_bc_k12", "max", budget, question)
    assert found is not None and found.fit_error is None and 1 <= found.layers_per_block < plan.CHECK_LAYERS

    def total(layers):
        return question.total(lambda: common.build_model(f"densenet_bc_{6 * layers + 4}_k12", "max"))

    assert found.total_bytes == total(found.layers_per_block) <= budget < total(found.layers_per_block + 1)
    assert found.parameter_bytes < found.total_bytes


def test_plan_deepest_by_quadratic_fit_matches_a_direct_prediction():
    question = plan.Question(2, 16)
    budget = 60 * 2**20
    found = plan.deepest("densenet_bc_k12", "max", budget, question)
    assert found is not None and found.layers_per_block > plan.CHECK_LAYERS
    assert found.fit_error < 1e-3
    direct = question.footprint(lambda: common.build_model(f"densenet_bc_{found.depth}_k12", "max"))
    assert common.total_bytes(direct) <= budget
    assert abs(common.total_bytes(direct) - found.total_bytes) <= 0.01 * found.total_bytes
    assert abs(direct.parameters - found.parameter_bytes) <= 0.01 * found.parameter_bytes


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots"], "16GiB"),
    (["--memory", "1GiB", "--model", "densenet121_efficient", "--input-size", "16"], "needs at least 29"),
    (["--memory", "1GiB", "--optimizer-copies", "-1"], "integer >= 0"),
    (["--memory", "1GiB", "--family", "resnet"], "densenet_bc_k<growth>"),
])
def test_plan_rejects_bad_input_saying_what_is_valid(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(main(["plan", *args]))
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_measures_allocator_peaks_in_mode_order():
    setting = bench.Setting(torch.device("cuda"), batch_size=16, input_size=32, repeats=2)
    rows = bench.measure("densenet_bc_40_k12", setting, ("false", "true", "max"))
    naive, efficient, most = (row["peak_bytes"] for row in rows)
    assert naive > efficient > most > 0
    assert naive >= 0.9 * rows[0]["predicted_bytes"]
    assert all(row["step_s"] > 0 for row in rows)
