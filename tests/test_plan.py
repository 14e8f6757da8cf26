"""`densenet-efficient plan`: memory sizes, largest batch, deepest network, on tiny configurations."""

import json

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.tools import bench, common, plan
from densenet_efficient.tools.cli import main

TINY = ["--model", "densenet_bc_10_k12", "--batch-size", "4", "--input-size", "16"]


@pytest.fixture
def short_fit(monkeypatch):
    """The depth fit through n = 4, 6, 8 and checked at n = 10, so that every fake step is of a small network (the
    search is the same at the default n = 16, 20, 24 and 28)."""
    monkeypatch.setattr(plan, "FIT_LAYERS", (4, 6, 8))
    monkeypatch.setattr(plan, "CHECK_LAYERS", 10)


def bc_k4(layers, mode):
    return lambda: de.create_model(f"densenet_bc_{6 * layers + 4}_k4", efficient=mode)


# ----------------------------------------------------------------------------------------------- planner


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GiB", 16 * 2**30),
        ("24GB", 24 * 10**9),
        ("512 MiB", 512 * 2**20),
        ("1.5gib", 3 * 2**29),
        ("100B", 100),
    ],
)
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["16", "lots", "-1GiB", "0GB", "16XB"])
def test_parse_memory_rejects_bad_sizes(text):
    with pytest.raises(Exception, match="KiB, MiB, GiB, TiB"):
        plan.parse_memory(text)


def test_plan_shows_a_line_per_fake_step_on_stderr_that_is_not_a_terminal(tmp_path, capsys):
    json_path = tmp_path / "plan.json"
    assert main(["plan", "--memory", "8MiB", *TINY, "--modes", "max", "--json", str(json_path)]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0].startswith("plan: about 4 fake training steps (one per line here)")
    steps = [line for line in lines if line.startswith("plan: fake step")]
    assert [line.split(":")[1] for line in steps] == [f" fake step {n}" for n in range(1, len(steps) + 1)]
    assert steps[0].startswith("plan: fake step 1: batch 4, side 16: total ") and "left]" in steps[0]
    assert len(steps) >= 3 and "largest batch" in out
    result = json.loads(json_path.read_text())
    assert result["batch_size"] == 4 and result["input_size"] == 16 and "progress" not in result


@pytest.mark.slow
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


@pytest.mark.slow
def test_plan_measure_checks_the_prediction_on_this_cpu(tmp_path, capsys):
    json_path = tmp_path / "plan.json"
    assert main(["plan", "--memory", "1GiB", *TINY, "--modes", "false,max", "--measure", "--json", str(json_path)]) == 0
    assert "measured, allocator" in capsys.readouterr().out
    rows = json.loads(json_path.read_text())["measured"]
    assert [row["mode"] for row in rows] == ["false", "max"]
    for row in rows:
        # The fake-tensor model is the live-tensor count of a real step; the allocator sees that and more.
        assert row["peak_bytes"] == row["predicted_bytes"]
        assert row["allocator_peak_bytes"] >= 0.95 * row["peak_bytes"]  # the profiler's records vary a little


@pytest.mark.slow
def test_plan_deepest_by_search_is_the_boundary(short_fit):
    question = plan.Question(2, 8)
    budget = 400_000  # naive at n = 10 layers per block needs 1,120,888 bytes: searched below it
    found = plan.deepest("densenet_bc_k4", False, budget, question)
    assert found is not None and found.fit_error is None and 1 <= found.layers_per_block < plan.CHECK_LAYERS
    fits, deeper = (question.total(bc_k4(found.layers_per_block + extra, False)) for extra in (0, 1))
    assert found.total_bytes == fits <= budget < deeper
    assert found.parameter_bytes < found.total_bytes


@pytest.mark.slow
def test_plan_deepest_by_quadratic_fit_matches_a_direct_prediction(short_fit):
    question = plan.Question(2, 8)
    budget = 1_600_000  # naive's total at n = 12 layers per block is 1,472,392 bytes, at n = 13 1,664,440
    found = plan.deepest("densenet_bc_k4", False, budget, question)
    assert found is not None and found.layers_per_block == 12 > plan.CHECK_LAYERS and found.depth == 76
    assert found.fit_error < 1e-3
    direct = question.footprint(bc_k4(12, False))
    assert direct.total() == found.total_bytes <= budget < question.total(bc_k4(13, False))
    assert direct.parameters == found.parameter_bytes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "lots"], "16GiB"),
        (["--memory", "1GiB", "--model", "densenet121_efficient", "--input-size", "16"], "needs at least 29"),
        (["--memory", "1GiB", "--optimizer-copies", "-1"], "integer >= 0"),
        (["--memory", "1GiB", "--family", "resnet"], "densenet_bc_k<growth>"),
    ],
)
def test_plan_rejects_bad_input_saying_what_is_valid(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(main(["plan", *args]))
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- volumes


def tiny_3d(mode):
    from densenet_efficient import DenseNet

    return DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        bn_size=2,
        num_classes=2,
        in_chans=1,
        spatial_dims=3,
        efficient=mode,
    )


def test_3d_models_plan_on_volumes():
    assert common.input_size("densenet121_3d", None) == 96
    assert common.input_label("densenet121_3d", 96) == "96x96x96"
    assert common.input_label("densenet121_efficient", 224) == "224x224"
    images, labels = common.random_batch(2, 8, 1, 2, spatial_dims=3)
    assert images.shape == (2, 1, 8, 8, 8) and labels.shape == (2,)
    with torch.device("meta"):
        assert common.model_io(tiny_3d(False)) == (1, 2, 3)
    # a volume's footprint grows with its side cubed: doubling it multiplies activations by 8
    question = plan.Question(batch_size=2, input_size=16)
    small, large = (
        question.footprint(lambda: tiny_3d(False)),
        plan.replace(question, input_size=32).footprint(lambda: tiny_3d(False)),
    )
    assert small.parameters == large.parameters and 7 < large.peak / small.peak <= 8


@pytest.mark.slow
@pytest.mark.parametrize("mode", [False, "max"])
def test_largest_input_is_the_largest_side_that_fits(mode):
    question = plan.Question(batch_size=2, input_size=16)
    build = lambda: tiny_3d(mode)  # noqa: E731
    budget = plan.replace(question, input_size=40).total(build)
    side, total = plan.largest_input(build, budget, question, smallest=5)
    assert side >= 40
    assert total == plan.replace(question, input_size=side).total(build) <= budget
    assert plan.replace(question, input_size=side + 1).total(build) > budget
    assert plan.largest_input(build, 1000, question, smallest=5) == (0, None)


@pytest.mark.slow
def test_plan_largest_input_cli(tmp_path, capsys):
    path = tmp_path / "plan.json"
    # 2.4 MiB: naive fits side 31, not 32 (2,664,584 bytes at batch 2); "max" fits 32 (1,917,800), not 64.
    args = ["--model", "densenet_bc_10_k12", "--batch-size", "2", "--memory", "2.4MiB", "--modes", "false,max"]
    assert main(["plan", *args, "--largest-input", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("densenet_bc_10_k12, 32x32, fp32: training within 0.00 GiB (0.00 GB)")
    assert "Largest input of densenet_bc_10_k12 at batch 2:" in out and "| efficient=False | 31 | 31x31 |" in out
    rows = json.loads(path.read_text())["largest_input"]
    assert [row["mode"] for row in rows] == ["false", "max"]
    assert rows[0]["side"] == 31 and 32 <= rows[1]["side"] < 64
    assert all(row["total_bytes"] <= 2.4 * 2**20 for row in rows)
