"""`densenet-efficient plan`: memory sizes, largest batch, deepest network, on tiny configurations."""

import json

import pytest
import torch

from densenet_efficient.tools import bench, common, plan
from densenet_efficient.tools.cli import main

TINY = ["--model", "densenet_bc_10_k12", "--batch-size", "4", "--input-size", "16"]
TINY_SETTING = bench.Setting(torch.device("cpu"), batch_size=4, input_size=16, repeats=1)


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
def test_plan_deepest_by_search_is_the_boundary():
    question = plan.Question(2, 16)
    budget = 8 * 2**20
    found = plan.deepest("densenet_bc_k12", "max", budget, question)
    assert found is not None and found.fit_error is None and 1 <= found.layers_per_block < plan.CHECK_LAYERS

    def total(layers):
        return question.total(lambda: common.build_model(f"densenet_bc_{6 * layers + 4}_k12", "max"))

    assert found.total_bytes == total(found.layers_per_block) <= budget < total(found.layers_per_block + 1)
    assert found.parameter_bytes < found.total_bytes


@pytest.mark.slow
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
