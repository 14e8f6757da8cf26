"""`densenet-efficient bench`: peers, measurement, tables, sweeps and argument checks, on tiny configurations."""

import csv
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import densenet_efficient as de
from densenet_efficient.tools import bench, common
from densenet_efficient.tools.cli import main

TINY = ["--model", "densenet_bc_10_k12", "--batch-size", "4", "--input-size", "16"]
TINY_SETTING = bench.Setting(torch.device("cpu"), batch_size=4, input_size=16, repeats=1)
LABELS = [
    "efficient=False",
    "efficient=True",
    "efficient='max'",
    "torch.utils.checkpoint (gpleiss/efficient_densenet_pytorch)",
]


# ----------------------------------------------------------------------------------------------- peers


@pytest.mark.parametrize("layers", [{}, {"norm": "instance", "act": "prelu"}])
def test_checkpoint_baseline_computes_what_the_naive_model_computes(layers):
    images, labels = common.random_batch(3, 16, 3, 10)
    grads = []
    for build in (
        lambda: de.create_model("densenet_bc_10_k12", efficient=False, **layers),
        lambda: bench.checkpointed_densenet("densenet_bc_10_k12", **layers),
    ):
        torch.manual_seed(0)
        model = build()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_naive, grads_naive), (loss_checkpoint, grads_checkpoint) = grads
    torch.testing.assert_close(loss_checkpoint, loss_naive)
    for got, expected in zip(grads_checkpoint, grads_naive, strict=True):
        torch.testing.assert_close(got, expected)


def test_baseline_is_torchvision_for_imagenet_models_and_checkpoint_for_cifar():
    label, build = bench.baseline("densenet121_efficient")
    assert "torchvision" in label
    with torch.device("meta"):
        theirs = build()
        ours = de.create_model("densenet121_efficient", efficient=True)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) == 7_978_856
    assert "checkpoint" in bench.baseline("densenet_bc_100_k12")[0]


def test_measured_cpu_peak_is_the_planners_prediction():
    rows = bench.measure("densenet_bc_10_k12", TINY_SETTING, ("true", "max"))
    for row in rows:
        predicted = common.predict(bench.make_peers("densenet_bc_10_k12", (row["mode"],))[0].build, 4, 16)
        assert predicted.peak == row["peak_bytes"]


def test_frozen_bn_steps_with_batch_norms_in_eval_mode_and_saves_memory():
    setting = bench.Setting(torch.device("cpu"), batch_size=4, input_size=16, repeats=0, frozen_bn=True)
    runners = {peer.key: bench.Runner(peer, setting) for peer in bench.make_peers("densenet_bc_10_k12")}
    peaks = {}
    for key, runner in runners.items():
        norms = [m for m in runner.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        buffers = [b.clone() for m in norms for b in m.buffers()]
        peaks[key] = runner.peak_bytes()
        assert norms and not any(norm.training for norm in norms)
        assert all(torch.equal(b, a) for b, a in zip(buffers, (b for m in norms for b in m.buffers()), strict=True))
        assert any(p.grad is not None for m in norms for p in m.parameters())
    assert max(peaks["true"], peaks["max"]) < peaks["false"]


def test_peer_that_would_not_fit_is_skipped_with_its_prediction(monkeypatch):
    monkeypatch.setattr(bench, "available_bytes", lambda device: 0)
    rows = bench.measure("densenet_bc_10_k12", TINY_SETTING, ("false", "max"))
    assert [row["skipped"] for row in rows] == [True, True]
    assert all(row["predicted_bytes"] > 0 and "peak_bytes" not in row for row in rows)
    assert "skipped" in bench.format_table(rows)


def test_timing_warnings_name_a_busy_machine_and_wide_spreads():
    rows = bench._with_ratios(
        [
            {"mode": "false", "label": "efficient=False", "skipped": False, "step_times": [1.0, 1.05, 0.98]},
            {"mode": "true", "label": "efficient=True", "skipped": False, "step_times": [1.0, 2.0, 1.2]},
        ],
        batch_size=4,
    )
    assert rows[1]["step_spread"] == pytest.approx(1.0 / 1.2)
    assert bench.timing_warnings(rows[:1], others_load=0.2, cores=2) == []
    busy, wide = bench.timing_warnings(rows, others_load=1.5, cores=2)
    assert "busy" in busy and "load average of 1.5 on its 2 CPUs" in busy
    assert "efficient=True 83%" in wide and "efficient=False" not in wide and "--repeats" in wide


def test_bench_warns_on_stderr_when_the_machine_is_busy(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    json_path = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--repeats", "1", "--modes", "false", "--json", str(json_path)]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning[0].startswith("densenet-efficient bench: warning: the machine is busy")
    assert json.loads(json_path.read_text())["warnings"][0].startswith("the machine is busy")


# ----------------------------------------------------------------------------------------------- bench command


def test_bench_writes_table_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "bench.json", tmp_path / "bench.csv"
    assert main(["bench", *TINY, "--repeats", "2", "--json", str(json_path), "--csv", str(csv_path)]) == 0
    out, err = capsys.readouterr()
    # stderr is no terminal here (as in CI, nohup, | tee): a line per peer measured and per timed round
    progress = [line.split(" [")[0] for line in err.splitlines() if line.startswith("bench: ")]
    assert progress == [
        "bench: 1 configuration(s) x 4 peers, 16 training steps; the time left is estimated from the first ones",
        *[f"bench: densenet_bc_10_k12, {label}: memory measured" for label in LABELS],
        "bench: densenet_bc_10_k12: timed round 1/2",
        "bench: densenet_bc_10_k12: timed round 2/2",
    ]
    assert "left]" in err.splitlines()[1]
    assert "counted in-process by a TorchDispatchMode" in out and "torch.profiler profile_memory" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith(
        "| mode | peak, live tensors (MiB) | memory x naive, live tensors | peak, allocator (MiB) | "
        "memory x naive, allocator | step (s) | time x naive | images/s"
    )
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {label}" for label in LABELS]

    rows = json.loads(json_path.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["false", "true", "max", "checkpoint"]
    naive = rows[0]
    assert naive["memory_ratio"] == naive["time_ratio"] == 1.0
    assert naive["peak_bytes"] == naive["predicted_bytes"]
    for row in rows:
        assert len(row["step_times"]) == 2 and row["step_s"] > 0
        spread = abs(row["step_times"][0] - row["step_times"][1]) / row["step_s"]
        assert row["step_spread"] == pytest.approx(spread) and f"| {spread:.0%} |" in table[2 + rows.index(row)] + " |"
        assert row["images_per_s"] == pytest.approx(4 / row["step_s"])
        assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / naive["peak_bytes"])
        # The allocator sees every tensor the dispatch counter sees, and kernels' temporaries besides; the profiler's
        # records of identical steps vary by a few percent (densenet_bc_10, one thread: -27 KB to +56 KB of 1.2 MB).
        assert row["allocator_peak_bytes"] >= 0.95 * row["peak_bytes"]
        assert row["allocator_memory_ratio"] == pytest.approx(
            row["allocator_peak_bytes"] / naive["allocator_peak_bytes"]
        )
    assert rows[1]["peak_bytes"] < naive["peak_bytes"] and rows[2]["peak_bytes"] < naive["peak_bytes"]
    # Operators per step: the efficient modes recompute, so they dispatch more; the line names each count.
    assert naive["operator_ratio"] == 1.0 and all(row["operators"] > naive["operators"] for row in rows[1:3])
    assert f"aten operators per training step (x naive): efficient=False {naive['operators']} (1.00)" in out

    with open(csv_path, newline="") as file:
        records = list(csv.DictReader(file))
    assert [record["mode"] for record in records] == ["false", "true", "max", "checkpoint"]
    assert [int(record["peak_bytes"]) for record in records] == [row["peak_bytes"] for row in rows]
    assert [int(record["allocator_peak_bytes"]) for record in records] == [row["allocator_peak_bytes"] for row in rows]


def test_optimizer_in_backward_lowers_the_peak_by_the_gradients(tmp_path, capsys):
    peaks = []
    for extra in ([], ["--optimizer-in-backward"]):
        path = tmp_path / f"bench{len(extra)}.json"
        assert main(["bench", *TINY, "--modes", "max", "--repeats", "1", "--json", str(path), *extra]) == 0
        peaks.append(json.loads(path.read_text())["rows"][0]["peak_bytes"])
    assert "optimizer step in backward" in capsys.readouterr().out
    gradients = sum(p.nbytes for p in de.create_model("densenet_bc_10_k12").parameters())
    assert peaks[1] < peaks[0] - gradients / 2


def test_pareto_front_keeps_the_rows_no_other_beats_on_memory_and_time():
    rows = [
        {"mode": "a", "allocator_memory_ratio": 1.0, "time_ratio": 1.0},  # d needs less of both
        {"mode": "b", "allocator_memory_ratio": 0.3, "time_ratio": 1.1},
        {"mode": "c", "allocator_memory_ratio": 0.4, "time_ratio": 1.2},  # so does b
        {"mode": "d", "allocator_memory_ratio": 0.9, "time_ratio": 0.8},
        {"mode": "e", "allocator_memory_ratio": 0.3, "time_ratio": 1.1},  # ties b: neither beats the other
        {"mode": "f", "allocator_memory_ratio": None, "time_ratio": 0.5},  # not measured
    ]
    front = bench.pareto_front(rows, "allocator_memory_ratio")
    assert [row["mode"] for row in front] == ["b", "d", "e"]  # d beats a


def test_pareto_plot_names_every_peer_in_a_legend_inside_the_image(tmp_path):
    """Each peer's full label in a legend beside the axes, the points only numbered, and the saved image wide
    enough for the legend (labels beside the points were clipped at the right edge, as
    'activation_memory_budget=0.1' of the rightmost point, and overlapped where points lie close)."""
    import matplotlib.pyplot as plt

    keys = ("false", "true", "max")
    setting = bench.Setting(torch.device("cpu"), compile=True, compile_budget=(0.5, 0.1))
    peers = bench.make_peers("densenet121_efficient", keys, setting)
    ratios = [(1.0, 1.0), (0.59, 0.32), (0.78, 0.25), (1.01, 0.97), (1.05, 0.27), (0.98, 0.21), (1.6, 0.3), (2.0, 0.23)]
    rows = [
        {"label": peer.label, "time_ratio": time, "allocator_memory_ratio": memory}
        for peer, (time, memory) in zip(peers, ratios, strict=True)
    ]
    figure = bench.pareto_figure(rows, "densenet121_efficient, batch 8, 224x224, fp32, compiled peers " * 2)
    axes = figure.axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels[: len(rows)] == [f"{n}: {row['label']}" for n, row in enumerate(rows, 1)]
    assert labels[-1].startswith("Pareto front") and labels[-2].endswith("activation_memory_budget=0.1")
    assert [text.get_text() for text in axes.texts] == [str(n) for n in range(1, len(rows) + 1)]
    renderer = figure.canvas.get_renderer()
    image = figure.get_tightbbox(renderer)  # what savefig(bbox_inches="tight") keeps, in inches
    for artist in (axes.get_legend(), axes.title, *axes.texts):
        box = artist.get_window_extent(renderer).transformed(figure.dpi_scale_trans.inverted())
        assert image.x0 <= box.x0 and box.x1 <= image.x1 and image.y0 <= box.y0 and box.y1 <= image.y1
    plt.close(figure)
    bench.pareto_figure(rows, "title", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_compiled_peers_are_measured_by_the_allocator_and_plotted(tmp_path, capsys):
    png, json_path = tmp_path / "pareto.png", tmp_path / "bench.json"
    args = [*TINY, "--modes", "false,true", "--repeats", "1", "--compile", "--compile-budget", "0.5"]
    args += ["--compile-backend", "aot_eager_decomp_partition", "--plot", str(png), "--json", str(json_path)]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "torch.compile, efficient=False, activation_memory_budget=0.5" in out
    rows = {row["mode"]: row for row in json.loads(json_path.read_text())["rows"]}
    assert list(rows) == ["false", "true", "false+compile", "true+compile", "false+budget0.5"]
    for key in ("false+compile", "true+compile", "false+budget0.5"):
        # Compiled graphs bypass the dispatch counter: only the allocator's figure is given for them.
        assert "peak_bytes" not in rows[key] and rows[key]["allocator_peak_bytes"] > 0
        assert rows[key]["time_ratio"] > 0
    assert rows["true+compile"]["allocator_peak_bytes"] < rows["false+compile"]["allocator_peak_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_depth_sweep_writes_a_plot_of_memory_growing_with_depth(tmp_path, capsys):
    png, json_path = tmp_path / "depth.png", tmp_path / "depth.json"
    args = [
        "bench",
        *TINY,
        "--repeats",
        "0",
        "--sweep",
        "depth",
        "--depths",
        "10,16",
        "--modes",
        "false,max",
        "--plot",
        str(png),
        "--json",
        str(json_path),
    ]
    assert main(args) == 0
    assert "| depth | mode |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(json_path.read_text())["rows"]
    for mode in ("false", "max"):
        peaks = [row["peak_bytes"] for row in rows if row["mode"] == mode]
        assert len(peaks) == 2 and peaks[0] < peaks[1]


@pytest.mark.slow
def test_batch_sweep_memory_is_affine_in_batch(tmp_path):
    json_path = tmp_path / "batch.json"
    args = [
        "bench",
        *TINY,
        "--repeats",
        "0",
        "--sweep",
        "batch",
        "--batch-sizes",
        "8,16,24",
        "--modes",
        "true",
        "--plot",
        str(tmp_path / "batch.png"),
        "--json",
        str(json_path),
    ]
    assert main(args) == 0
    peaks = [row["peak_bytes"] for row in json.loads(json_path.read_text())["rows"]]
    assert peaks[1] - peaks[0] == peaks[2] - peaks[1] > 0
    assert (tmp_path / "batch.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_times_a_two_process_step_with_and_without_sync_batchnorm(tmp_path, capsys):
    json_path = tmp_path / "sync.json"
    args = [
        "--model",
        "densenet_bc_10_k12",
        "--batch-size",
        "2",
        "--input-size",
        "8",
        "--repeats",
        "2",
        "--modes",
        "false,max,checkpoint",
        "--sync-bn-processes",
        "2",
        "--json",
        str(json_path),
    ]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "2 processes of 1 thread(s), batch 2 per process" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0] == "| mode | step (s), BatchNorm | step (s), SyncBatchNorm | time x BatchNorm |"
    assert [line.split(" | ")[0] for line in table[2:]] == ["| efficient=False", "| efficient='max'"]
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["false", "max"]
    for row in rows:
        assert len(row["step_times"]) == len(row["sync_step_times"]) == 2
        assert row["sync_time_ratio"] == pytest.approx(row["sync_step_s"] / row["step_s"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sync-bn-processes", "1"], "integer >= 2"),
        (["--sync-bn-processes", "2", "--repeats", "0"], "--sync-bn-processes needs --repeats >= 1"),
        (["--model", "densenet_bc_99_k12"], "6n+4"),
        (["--model", "resnet50"], "Available models"),
        (["--dtype", "fp8"], "fp32"),
        (["--device", "tpu"], "valid here: cpu"),
        (["--modes", "false,fast"], "choose from false, true, max, checkpoint"),
        (["--sweep", "depth", "--depths", "10,41"], "6n+4"),
        (["--input-size", "2"], "needs at least 4"),
        (["--batch-size", "0"], "integer >= 1"),
        (["--repeats", "-1"], "integer >= 0"),
        (["--compile-budget", "0"], "numbers in (0, 1]"),
        (["--compile-budget", "0.5,x"], "numbers in (0, 1]"),
        (["--optimizer-in-backward", "--dtype", "fp16"], "not with --dtype fp16"),
        (["--norm", "bogus"], "instance"),
    ],
)
def test_bench_rejects_bad_input_saying_what_is_valid(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        exit_code = main(["bench", *args])
        raise SystemExit(exit_code)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_and_plan_keep_heavy_imports_lazy():
    code = (
        "import sys, densenet_efficient.tools.bench, densenet_efficient.tools.plan; "
        "print([m for m in ('matplotlib', 'torchvision') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_measures_allocator_peaks_in_mode_order():
    setting = bench.Setting(torch.device("cuda"), batch_size=16, input_size=32, repeats=2)
    rows = bench.measure("densenet_bc_40_k12", setting, ("false", "true", "max"))
    naive, efficient, most = (row["peak_bytes"] for row in rows)
    assert naive > efficient > most > 0
    assert naive >= 0.9 * rows[0]["predicted_bytes"]
    assert all(row["step_s"] > 0 for row in rows)


# ----------------------------------------------------------------------------------------------- features_only


def test_features_only_backbones_keep_the_savings():
    from dataclasses import replace

    setting = replace(TINY_SETTING, features_only=True, repeats=0, warmup=0)
    rows = bench.measure("densenet_bc_10_k12", setting)
    ratios = {row["mode"]: row["memory_ratio"] for row in rows}
    assert all(row["label"].endswith(", features_only") for row in rows)
    assert ratios["max"] < ratios["true"] < 0.8 and ratios["false"] == 1.0


def test_features_only_torchvision_peer_returns_every_level():
    config = {
        "growth_rate": 4,
        "block_config": (1, 1, 1, 1),
        "num_init_features": 8,
        "bn_size": 4,
        "drop_rate": 0.0,
        "num_classes": 3,
    }
    probe = bench.features_only_peer(lambda: bench.torchvision_densenet(config))
    maps = probe.backbone(torch.randn(2, 3, 64, 64))
    assert list(maps) == ["relu0", "denseblock1", "denseblock2", "denseblock3", "norm5"]
    assert [m.shape[1] for m in maps.values()] == [8, 12, 10, 9, 8]
    assert probe(torch.randn(2, 3, 64, 64)).shape == (2, 3) and common.model_io(probe) == (3, 3, 2)


def test_baseline_for_3d_models_is_monai():
    pytest.importorskip("monai")
    label, build = bench.baseline("densenet121_3d")
    assert label == "MONAI DenseNet (plain autograd)"
    with torch.device("meta"):
        model = build()
    assert type(model).__module__ == "monai.networks.nets.densenet"
    assert common.model_io(model) == (1, 2, 3)
    assert sum(p.numel() for p in model.parameters()) == 11_244_674


def test_norm_and_act_reach_every_peer_the_baseline_included():
    setting = bench.Setting(torch.device("cpu"), norm="instance", act="prelu")
    with torch.device("meta"):
        for name, norm in (
            ("densenet_bc_10_k12", torch.nn.InstanceNorm2d),
            ("densenet121_3d", torch.nn.InstanceNorm3d),
        ):
            for peer in bench.make_peers(name, setting=setting):
                kinds = {type(module) for module in peer.build().modules()}
                assert (
                    norm in kinds
                    and torch.nn.PReLU in kinds
                    and not kinds & {torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.ReLU}
                )
