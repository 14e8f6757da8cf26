"""The trainer and `eval`: accuracy on digits in every memory mode, DDP, exact resume, safe checkpoints, fine-tuning.

Runs are tiny (a DenseNet-BC with one layer per block, 8 or 16 px digits, one thread) so the file stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from densenet_efficient.tools import train as train_module
from densenet_efficient.tools.cli import main
from densenet_efficient.tools.common import UsageError
from densenet_efficient.tools.data import DatasetNotFoundError, UnreadableImagesError, build_splits
from densenet_efficient.tools.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    checkpoints,
    distributed,
    load_checkpoint,
    train,
)
from tests.weights_helpers import FullDiskFile

pytest.importorskip("sklearn")

TINY = {"block_config": (1, 1, 1), "growth_rate": 12, "num_init_features": 24}


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside the block (the tiny runs are fastest so on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def digits_config(output: Path, **overrides) -> TrainConfig:
    """A small digits run: BC network with one layer per block, 8 px, batch 32, no progress bars."""
    options = dict(
        dataset="digits",
        model="densenet_bc_100_k12",
        model_args=dict(TINY),
        image_size=8,
        epochs=2,
        batch_size=32,
        workers=0,
        progress=False,
        output=str(output),
    )
    return TrainConfig(**{**options, **overrides})


def final_state(output: Path) -> dict[str, torch.Tensor]:
    """Model state of the newest checkpoint in ``output``."""
    return load_checkpoint(checkpoints(output)[-1])[0]


# -- accuracy and memory modes --------------------------------------------------------------------------------------

MODES = (False, True, "max")


def run_every_mode(root: Path, **overrides) -> dict:
    """The same digits run (16 px, seed 0) in each memory mode: {mode: (results, per-epoch history)}."""
    runs = {}
    with one_thread():
        for mode in MODES:
            output = root / str(mode)
            results = train(digits_config(output, efficient=mode, image_size=16, export=False, **overrides))
            runs[mode] = (results, load_checkpoint(checkpoints(output)[-1])[1]["history"])
    return runs


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> dict:
    """Six epochs of the recipe (lr 0.1, x0.1 after epochs 3 and 4.5) in each mode."""
    return run_every_mode(tmp_path_factory.mktemp("recipe"), epochs=6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_digits_reach_90_percent_in_every_memory_mode(recipe_runs, mode):
    results, history = recipe_runs[mode]
    assert len(history) == 6
    assert results["test"]["images"] == 359
    assert results["test"]["top1"] > 90, results
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


@pytest.fixture(scope="module")
def low_lr_runs(tmp_path_factory) -> dict:
    """Two epochs at lr 0.001 in each mode. SGD on this tiny net amplifies rounding-level differences (the modes
    agree per step to float precision): at lr 0.1 to percents within an epoch, at lr 0.01 to 1e-3 of the
    validation loss on some CPUs (an AMD EPYC); at lr 0.001 they stayed within 1e-7 there."""
    return run_every_mode(tmp_path_factory.mktemp("low-lr"), epochs=2, lr=0.001)


@pytest.mark.slow
@pytest.mark.parametrize("mode", (True, "max"), ids=str)
def test_efficient_modes_follow_the_naive_loss_curve(low_lr_runs, mode):
    naive, efficient = low_lr_runs[False][1], low_lr_runs[mode][1]
    for key in ("train_loss", "val_loss"):
        expected = torch.tensor([row[key] for row in naive], dtype=torch.float64)
        actual = torch.tensor([row[key] for row in efficient], dtype=torch.float64)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=0, msg=f"{key} differs")
    assert naive[-1]["train_loss"] < naive[0]["train_loss"]


# -- distributed data parallel --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config: TrainConfig, result_dir: str) -> None:
    """One torchrun-like process: join the gloo group, train, save this rank's parameters."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    with distributed(None) as ctx:
        _fit_and_save(Trainer(config.resolved(), ctx), Path(result_dir) / f"rank{rank}.pt")


def _fit_and_save(trainer: Trainer, path: Path) -> None:
    """Train and save the parameters, buffers and results; the trainer (and its DDP) is gone when this returns,
    before the group's teardown, as in :func:`train`."""
    results = trainer.fit()
    torch.save(
        {
            "params": {k: v.detach() for k, v in trainer.model.named_parameters()},
            "buffers": dict(trainer.model.named_buffers()),
            "results": results,
        },
        path,
    )


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    config = digits_config(tmp_path / "ddp", epochs=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), f"{name} differs between ranks"
    assert ranks[0]["results"]["test"] == ranks[1]["results"]["test"]

    # One process, two accumulation steps: the same micro-batches as the two ranks, so the same updates.
    train(digits_config(tmp_path / "single", epochs=1, accum_steps=2))
    single = final_state(tmp_path / "single")
    for name, value in ranks[0]["params"].items():
        torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert ranks[0]["params"]["classifier.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_sync_bn_two_processes_match_one_process_on_the_whole_batch(tmp_path, mode):
    """--sync-bn in every memory mode: two processes normalise with the statistics of both halves of the batch, so
    they train as one process on the whole batch with plain BatchNorm (without it they would not: see the
    accumulation steps the plain DDP test needs)."""
    # A few steps (1/5 of the training images): over many, SGD on this tiny net turns rounding differences (the
    # statistics are summed in another order) into visible ones, as between the memory modes.
    options = {"epochs": 1, "efficient": mode, "val_fraction": 0.8}
    config = digits_config(tmp_path / "ddp", sync_bn=True, **options)
    mp.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for group in ("params", "buffers"):
        for name, value in ranks[0][group].items():
            assert torch.equal(value, ranks[1][group][name]), f"{name} differs between ranks"

    train(digits_config(tmp_path / "single", **options))
    single = final_state(tmp_path / "single")
    for group in ("params", "buffers"):
        for name, value in ranks[0][group].items():
            torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    assert ranks[0]["buffers"]["features.norm5.num_batches_tracked"] == single["features.norm5.num_batches_tracked"]


# -- checkpoints and resume -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 4-epoch run (lr 0.1, 0.1, 0.01, 0.001) and its results."""
    output = tmp_path_factory.mktemp("uninterrupted")
    with one_thread():
        return output, train(digits_config(output, epochs=4))


@pytest.mark.slow
def test_resume_after_a_crash_equals_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    reference_dir, reference = uninterrupted
    original = Trainer._train_epoch

    def crash_in_epoch_3(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(tmp_path, epochs=4))
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0001.pt", "epoch-0002.pt"]
    monkeypatch.setattr(Trainer, "_train_epoch", original)

    resumed = train(digits_config(tmp_path, epochs=4, resume=True))
    assert resumed["test"] == reference["test"]
    expected_state, expected = load_checkpoint(checkpoints(reference_dir)[-1])
    actual_state, actual = load_checkpoint(checkpoints(tmp_path)[-1])
    assert [row["lr"] for row in actual["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    for key in ("epoch", "scheduler"):
        assert actual[key] == expected[key], key
    # the same best epoch and score; the sha256 differs only by the run id in the file's metadata
    assert {k: actual["best"][k] for k in ("epoch", "score")} == {k: expected["best"][k] for k in ("epoch", "score")}

    def untimed(history):
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]

    assert untimed(actual["history"]) == untimed(expected["history"])
    for name, value in expected_state.items():
        assert torch.equal(actual_state[name], value), name


@pytest.mark.slow
def test_resume_refuses_another_recipe(uninterrupted):
    output, _ = uninterrupted
    with pytest.raises(CheckpointError, match=r"another recipe \(lr: checkpoint 0.1, now 0.05\)"):
        train(digits_config(output, epochs=4, lr=0.05, resume=True))


@pytest.mark.slow
def test_truncated_or_corrupt_checkpoint_is_refused_and_the_previous_one_survives(uninterrupted, tmp_path):
    source, _ = uninterrupted
    for path in (source / "checkpoints").iterdir():
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / path.name).write_bytes(path.read_bytes())
    newest, previous = checkpoints(tmp_path)[-1], checkpoints(tmp_path)[-2]
    assert (newest.name, previous.name) == ("epoch-0004.pt", "epoch-0003.pt")
    good_state = newest.read_bytes()

    newest.write_bytes(good_state[: len(good_state) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        train(digits_config(tmp_path, epochs=4, resume=True))
    assert f"--resume {previous}" in str(error.value)
    assert load_checkpoint(previous)[1]["epoch"] == 3

    newest.write_bytes(good_state)
    weights = newest.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor: safetensors alone would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(newest)


@pytest.mark.slow
def test_an_interrupted_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    original_replace = os.replace

    def interrupted_after_epoch_1(source, target):
        if str(target).endswith("epoch-0002.pt"):
            raise KeyboardInterrupt  # Ctrl-C after the temporary file was written, before the rename
        original_replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(tmp_path, epochs=2))
    monkeypatch.setattr(os, "replace", original_replace)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "epoch-0001.pt",
        "epoch-0001.safetensors",
        "epoch-0002.safetensors",
    ]
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0001.pt"]
    assert load_checkpoint(folder / "epoch-0001.pt")[1]["epoch"] == 1
    results = train(digits_config(tmp_path, epochs=2, resume=True))
    assert results["epochs"] == 2


# -- command line, export, eval and fine-tuning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`densenet-efficient train` on digits (3 epochs, 16 px) with the export at the end."""
    output = tmp_path_factory.mktemp("cli")
    args = [
        "train",
        "--output",
        str(output),
        "--image-size",
        "16",
        "--epochs",
        "3",
        "--no-progress",
        "--model-arg",
        "block_config=1,1,1",
        "--efficient",
        "max",
    ]
    with one_thread():
        assert main(args) == 0
    return output


@pytest.mark.slow
def test_cli_train_writes_log_plot_results_and_export(cli_run):
    rows = (cli_run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "lr", "train_loss", "train_top1"]
    assert len(rows) == 4
    assert (cli_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((cli_run / "results.json").read_text())
    assert results["test"]["images"] == 359
    config = json.loads((cli_run / "export" / "config.json").read_text())
    assert config["architecture"] == "densenet_bc_100_k12"
    assert config["model_args"]["block_config"] == [1, 1, 1]
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16]
    entry = json.loads((cli_run / "manifest_entry.json").read_text())
    assert entry["metrics"][0]["top1"] == round(results["test"]["top1"], 3)
    assert entry["hub"]["size"] == (cli_run / "export" / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_cli_eval_reproduces_the_test_accuracy_with_the_weights_preprocessing(cli_run, tmp_path):
    report = tmp_path / "eval.json"
    assert main(["eval", "densenet_bc_100_k12", "--weights", str(cli_run / "export"), "--json", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    expected = json.loads((cli_run / "results.json").read_text())["test"]
    assert evaluated["images"] == expected["images"]
    assert evaluated["top1"] == pytest.approx(expected["top1"])
    assert evaluated["top5"] == pytest.approx(expected["top5"])


def _digits_imagefolder(root: Path, classes: range) -> None:
    """Write the digits of ``classes`` as 8x8 grayscale PNGs, one folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label in classes:
            folder = root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(folder / f"{index}.png")


@pytest.mark.slow
def test_fine_tune_an_export_on_a_new_number_of_classes(cli_run, tmp_path):
    _digits_imagefolder(tmp_path / "images", range(5))
    export = cli_run / "export"
    config = TrainConfig(
        dataset="imagefolder",
        data=str(tmp_path / "images"),
        model="densenet_bc_100_k12",
        weights=str(export),
        freeze_backbone=True,
        epochs=3,
        batch_size=32,
        lr=0.1,
        workers=0,
        progress=False,
        output=str(tmp_path / "fine-tuned"),
    )
    with pytest.warns(UserWarning, match="10 classes, the model 5"):
        results = train(config)
    assert results["test"]["top1"] > 80, results

    from safetensors.torch import load_file

    pretrained = load_file(export / "model.safetensors")
    tuned = load_file(tmp_path / "fine-tuned" / "export" / "model.safetensors")
    assert tuned["classifier.weight"].shape == (5, pretrained["classifier.weight"].shape[1])
    backbone = [key for key in pretrained if not key.startswith("classifier.")]
    assert backbone and all(torch.equal(tuned[key], pretrained[key]) for key in backbone)
    splits = build_splits("imagefolder", tmp_path / "images", val_fraction=0.1)
    assert results["test"]["images"] == len(splits.test)


# -- bad input ------------------------------------------------------------------------------------------------------


def test_missing_cifar_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--download"):
        build_splits("cifar10", tmp_path)


@pytest.mark.parametrize(("batch_size", "said"), [(32, "trains on 1280 of the 1294 training images"), (647, None)])
def test_images_an_epoch_leaves_out_are_said(tmp_path, capsys, batch_size, said):
    """Full batches only (drop_last): the images of an incomplete last batch are said to be left out, not dropped
    silently; a batch size dividing the training set (1294 digits) leaves none out and says nothing."""
    train(digits_config(tmp_path, epochs=1, batch_size=batch_size, export=False, val_fraction=0.1))
    out = capsys.readouterr().out
    if said is None:
        assert "left out" not in out
    else:
        assert said in out and "other 14" in out and "left out" in out


def test_slow_steps_show_their_rate_not_zero():
    fields = train_module._progress_fields(2.0, 50.0, 0.0421, torch.device("cpu"))
    assert fields["img/s"] == "0.0421"
    row = {"epoch": 1, "lr": 0.1, "train_loss": 1.0, "train_top1": 50.0, "images_per_s": 3.14159}
    assert "3.14 img/s" in train_module._epoch_line(row)
    assert "1234 img/s" in train_module._epoch_line({**row, "images_per_s": 1234.4})


def test_resume_does_not_repeat_the_warnings_of_weights_it_replaces(one_epoch, tmp_path):
    """Fine-tuning 10-class weights on 5 classes warns once, in the run that loads them; its --resume, whose
    checkpoint replaces those weights, does not warn again."""
    _digits_imagefolder(tmp_path / "images", range(5))
    config = dict(
        dataset="imagefolder",
        data=str(tmp_path / "images"),
        weights=str(one_epoch / "best.safetensors"),
        image_size=8,
        export=False,
    )
    with pytest.warns(UserWarning, match="10 classes, the model 5"):
        train(digits_config(tmp_path / "run", **config, epochs=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(digits_config(tmp_path / "run", **config, epochs=2, resume=True))
    assert not [w for w in caught if "classes" in str(w.message)], [str(w.message) for w in caught]


def test_optimizer_in_backward_trains_the_same_weights_and_checkpoints(tmp_path):
    states = []
    for fused in (False, True):
        output = tmp_path / str(fused)
        train(digits_config(output, efficient="max", export=False, optimizer_in_backward=fused))
        model_state, state = load_checkpoint(checkpoints(output)[-1])
        history = [{key: value for key, value in row.items() if key != "images_per_s"} for row in state["history"]]
        states.append((model_state, state["optimizer"], history))
    (model, optimizer, history), (fused_model, fused_optimizer, fused_history) = states
    assert all(torch.equal(fused_model[key], value) for key, value in model.items())
    assert fused_optimizer["param_groups"] == optimizer["param_groups"]  # the scheduler's learning rate
    assert all(
        torch.equal(fused_optimizer["state"][index]["momentum_buffer"], entry["momentum_buffer"])
        for index, entry in optimizer["state"].items()
    )
    assert fused_history == history


@pytest.mark.parametrize(
    "option, value, environment", [("accum_steps", 2, "1"), ("amp", "fp16", "1"), ("epochs", 2, "2")]
)
def test_optimizer_in_backward_refuses_what_it_cannot_step_exactly(tmp_path, monkeypatch, option, value, environment):
    monkeypatch.setenv("WORLD_SIZE", environment)
    monkeypatch.setattr(train_module, "_data", lambda config: pytest.fail("data loaded before the check"))
    with pytest.raises(UsageError, match="--optimizer-in-backward.*accum-steps.*fp16.*several processes"):
        train(digits_config(tmp_path / "run", optimizer_in_backward=True, **{option: value}))
    assert not (tmp_path / "run").exists()


def test_batch_must_split_evenly_into_accumulation_steps(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 32 must be divisible by .* \(1 x 3 = 3\)"):
        train(digits_config(tmp_path, accum_steps=3))
    assert not (tmp_path / "checkpoints").exists()


# -- runs that cannot end "successfully" with a broken result -------------------------------------------------------


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_non_finite_loss_stops_the_run_and_nothing_is_written(tmp_path):
    with pytest.raises(
        TrainingDivergedError,
        match=r"training diverged in epoch 1: the training loss is (nan|inf) "
        r"\(lr 1e\+06\)\. .*nothing of epoch 1 was saved or exported",
    ):
        train(digits_config(tmp_path, lr=1e6, epochs=1))
    written = {path.name for path in tmp_path.rglob("*")}
    assert not written & {"best.safetensors", "results.json", "export", "manifest_entry.json", "metrics.csv"}
    assert checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", float("nan"), "lr must be a finite number above 0, got nan"),
        ("lr", -0.1, "lr must be a finite number above 0, got -0.1"),
        ("lr", float("inf"), "lr must be a finite number above 0, got inf"),
        ("gamma", -5.0, r"gamma must be a finite number in \(0, 1\], got -5.0"),
        ("momentum", 1.5, r"momentum must be a finite number in \[0, 1\), got 1.5"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number of at least 0, got nan"),
        ("val_fraction", 1.0, r"val_fraction must be a finite number in \[0, 1\), got 1.0"),
        ("milestones", (0.5, float("nan")), r"milestones are fractions of the epochs in \(0, 1\], got \(0.5, nan\)"),
        ("epochs", 0, "epochs must be a whole number of at least 1, got 0"),
        ("batch_size", 2.5, "batch_size must be a whole number of at least 1, got 2.5"),
        ("workers", -1, "workers must be a whole number of at least 0, got -1"),
        ("seed", -3, "seed must be a whole number of at least 0, got -3"),
    ],
)
def test_numeric_options_are_checked_before_anything_is_built(tmp_path, monkeypatch, option, value, message):
    monkeypatch.setattr(
        train_module, "_data", lambda config: pytest.fail("data loaded before the options were checked")
    )
    with pytest.raises(UsageError, match=message):
        train(digits_config(tmp_path / "run", **{option: value}))
    assert not (tmp_path / "run").exists()


def test_nesterov_without_momentum_is_refused_up_front(tmp_path):
    with pytest.raises(UsageError, match="Nesterov momentum needs a momentum above 0: pass --no-nesterov"):
        train(digits_config(tmp_path, momentum=0.0))


def test_output_that_is_a_file_or_cannot_be_written_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "_data", lambda config: pytest.fail("data loaded before --output was checked"))
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(UsageError, match=f"--output {file} is a file, not a folder"):
        train(digits_config(file))
    with pytest.raises(UsageError, match=f"--output {file / 'run'} cannot be written to: Not a directory"):
        train(digits_config(file / "run"))


def test_a_non_empty_output_needs_resume_or_overwrite(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    before = {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}
    with pytest.raises(
        UsageError,
        match=f"--output {output} is not empty: pass --resume to continue the run in it, "
        "--overwrite to delete its run files",
    ):
        train(digits_config(output, epochs=1))
    assert {path: path.read_bytes() for path in output.rglob("*") if path.is_file()} == before


@pytest.mark.slow
def test_two_runs_into_one_folder_killed_and_resumed_export_the_second_runs_best(uninterrupted, tmp_path, monkeypatch):
    """The issue's scenario: a finished 4-epoch run, a second run into the same folder (now only with --overwrite)
    killed after its first epoch, then --resume: the results and the export are the second run's own."""
    output = copy_run(uninterrupted[0], tmp_path / "run")
    (output / "notes.txt").write_text("kept")  # not a run file: --overwrite leaves it
    original = Trainer._train_epoch

    def killed_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # as SIGKILL: nothing after the epoch-1 checkpoint runs
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(output, epochs=2, seed=1, overwrite=True))
    assert [p.name for p in checkpoints(output)] == ["epoch-0001.pt"]
    assert not (output / "results.json").exists() and (output / "notes.txt").read_text() == "kept"
    monkeypatch.setattr(Trainer, "_train_epoch", original)

    results = train(digits_config(output, epochs=2, seed=1, resume=True))
    model_state, state = load_checkpoint(checkpoints(output)[-1])
    assert [p.name for p in checkpoints(output)] == ["epoch-0001.pt", "epoch-0002.pt"]
    assert results["best_epoch"] == state["best"]["epoch"] and results["epochs"] == 2
    from safetensors import safe_open
    from safetensors.torch import load_file

    best = output / "best.safetensors"
    with safe_open(str(best), "pt") as file:
        assert file.metadata()["run_id"] == state["run_id"]
        assert file.metadata()["epoch"] == str(state["best"]["epoch"])
    assert hashlib.sha256(best.read_bytes()).hexdigest() == state["best"]["sha256"]
    exported = load_file(output / "export" / "model.safetensors")
    best_epoch = load_file(output / "checkpoints" / f"epoch-{state['best']['epoch']:04d}.safetensors")
    assert exported.keys() == best_epoch.keys()
    assert all(torch.equal(exported[key], best_epoch[key]) for key in exported)


def test_best_weights_of_another_epoch_or_run_are_restored_or_refused(uninterrupted, tmp_path):
    """best.safetensors replaced by another epoch's weights: restored from the best epoch's checkpoint while it is
    kept (with a warning), refused once it is not."""
    output = copy_run(uninterrupted[0], tmp_path / "run")
    _, state = load_checkpoint(checkpoints(output)[-1])
    run = state["run_id"]
    assert state["best"]["epoch"] == 3
    best, kept = output / "best.safetensors", output / "checkpoints" / "epoch-0003.safetensors"
    shutil.copy(output / "checkpoints" / "epoch-0004.safetensors", best)
    with pytest.warns(
        UserWarning,
        match=rf"best.safetensors holds epoch 4 of run {run}, not epoch 3 of run {run}; "
        rf"restored the best weights of this run \(epoch 3\) from {kept}",
    ):
        results = train(digits_config(output, epochs=4, resume=True))
    assert results["test"] == uninterrupted[1]["test"] and best.read_bytes() == kept.read_bytes()
    shutil.copy(output / "checkpoints" / "epoch-0004.safetensors", best)
    kept.unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"best.safetensors holds epoch 4 of run {run}, not epoch 3 of run "
        rf"{run}: it must hold the weights of epoch 3.*no longer kept. Restore "
        rf"best.safetensors from a backup to go on, or start afresh with "
        rf"--overwrite",
    ):
        train(digits_config(output, epochs=4, resume=True))


def test_missing_best_weights_on_resume_say_what_is_missing_and_what_to_do(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    best, kept = output / "best.safetensors", output / "checkpoints" / "epoch-0003.safetensors"
    best.unlink()
    with pytest.warns(UserWarning, match=r"best.safetensors is missing; restored the best weights of this run"):
        assert train(digits_config(output, epochs=4, resume=True))["test"] == uninterrupted[1]["test"]
    best.unlink()
    kept.unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"{best} is missing: it must hold the weights of epoch 3, the best of "
        rf"this run so far, which are exported at the end, and {kept} \(the "
        rf"same weights\) is no longer kept",
    ):
        train(digits_config(output, epochs=4, resume=True))


@pytest.mark.slow
def test_resume_with_more_epochs_extends_the_run_with_the_new_schedule(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    with pytest.raises(UsageError, match=r"epoch-0004.pt is at epoch 4: resume it with --epochs 4 or more, not 3"):
        train(digits_config(output, epochs=3, resume=True))
    with pytest.warns(
        UserWarning,
        match=r"extending the run from 4 to 8 epochs: from epoch 5 on the learning rate "
        r"follows the schedule of 8 epochs \(milestones \[4, 6\], lr now 0.01\)",
    ):
        results = train(digits_config(output, epochs=8, resume=True))
    _, state = load_checkpoint(checkpoints(output)[-1])
    # epochs 1-4 keep the 4-epoch schedule; 5-8 follow the 8-epoch one (x0.1 after epochs 4 and 6)
    assert [row["lr"] for row in state["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.01, 0.01, 0.001, 0.001])
    assert results["epochs"] == 8 and state["config"]["epochs"] == 8


@pytest.mark.parametrize(
    "option, value, listing",
    [
        ("accum_steps", 2, "accum_steps: checkpoint 1, now 2"),
        ("amp", "bf16", "amp: checkpoint None, now 'bf16'"),
    ],
)
def test_resume_refuses_another_accumulation_or_precision(uninterrupted, option, value, listing):
    with pytest.raises(CheckpointError, match=rf"another recipe \({listing}\); resume with the same settings"):
        train(digits_config(uninterrupted[0], epochs=4, resume=True, **{option: value}))


@pytest.mark.slow
def test_eval_reads_best_weights_and_a_checkpoint_directly(cli_run, tmp_path):
    expected = json.loads((cli_run / "results.json").read_text())["test"]
    for weights in (cli_run / "best.safetensors", cli_run / "checkpoints" / "epoch-0003.safetensors"):
        report = tmp_path / f"{weights.stem}.json"
        assert main(["eval", "densenet_bc_100_k12", "--weights", str(weights), "--json", str(report)]) == 0
        evaluated = json.loads(report.read_text())
        assert evaluated["images"] == expected["images"]
        if weights.name == "best.safetensors":
            assert evaluated["top1"] == pytest.approx(expected["top1"])


# -- unreadable images -----------------------------------------------------------------------------------------------


def _damaged_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a truncated PNG (real files cut in half) in ``folder``."""
    from PIL import Image

    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    damaged = []
    for name in ("cut.jpg", "cut.png"):
        path = folder / name
        noise.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        damaged.append(path)
    return damaged


def test_unreadable_images_are_named_before_training(tmp_path, monkeypatch):
    _digits_imagefolder(tmp_path / "images", range(2))
    total = sum(1 for _ in (tmp_path / "images").rglob("*.png")) + 2
    jpeg, png = _damaged_images(tmp_path / "images" / "class1")
    with pytest.raises(
        UnreadableImagesError,
        match=rf"2 of {total} images cannot be read: .*{jpeg} \(OSError: "
        rf".*truncated.*; .*{png} \(.*--bad-images skip",
    ):
        build_splits("imagefolder", tmp_path / "images")
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, epoch: pytest.fail("training started"))
    config = TrainConfig(
        dataset="imagefolder",
        data=str(tmp_path / "images"),
        model="densenet_bc_100_k12",
        model_args=dict(TINY),
        image_size=8,
        output=str(tmp_path / "run"),
        progress=False,
    )
    with pytest.raises(UnreadableImagesError, match=re.escape(str(jpeg))):
        train(config)


def test_unreadable_images_can_be_skipped_with_a_count(tmp_path):
    _digits_imagefolder(tmp_path / "images", range(2))
    readable = sum(1 for _ in (tmp_path / "images").rglob("*.png"))
    _damaged_images(tmp_path / "images" / "class0")
    with pytest.warns(UserWarning, match=rf"skipped 2 unreadable images of {readable + 2}: .*cut.jpg"):
        splits = build_splits("imagefolder", tmp_path / "images", bad_images="skip")
    assert len(splits.train) + len(splits.val) + len(splits.test) == readable
    for index in range(len(splits.train)):  # every image of the training set loads
        splits.train[index]


@pytest.mark.slow
def test_a_crash_between_the_checkpoint_and_the_best_weights_is_repaired_on_resume(tmp_path, monkeypatch):
    """Killed after epoch 2's checkpoint (which records epoch 2 as the best) but before best.safetensors was
    replaced: the resume restores the recorded best weights from that checkpoint, and exports them."""
    original_replace = os.replace
    best_writes = []

    def killed_before_the_second_best(source, target):
        if str(target).endswith("best.safetensors"):
            best_writes.append(target)
            if len(best_writes) == 2:
                raise KeyboardInterrupt
        original_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_the_second_best)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(tmp_path, epochs=2))
    monkeypatch.setattr(os, "replace", original_replace)
    _, state = load_checkpoint(checkpoints(tmp_path)[-1])
    assert state["best"]["epoch"] == 2
    with pytest.warns(UserWarning, match=r"best.safetensors holds epoch 1 of run \w+, not epoch 2 .*restored"):
        results = train(digits_config(tmp_path, epochs=2, resume=True))
    assert results["best_epoch"] == 2
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export" / "model.safetensors")
    recorded = load_file(tmp_path / "checkpoints" / "epoch-0002.safetensors")
    assert all(torch.equal(exported[key], recorded[key]) for key in recorded)


def test_numpy_numbers_are_accepted_and_resume_with_overwrite_is_refused(tmp_path):
    import numpy as np

    config = digits_config(tmp_path, epochs=np.int64(2), lr=np.float64(0.1), milestones=(np.float64(0.5),))
    recipe = config.resolved().recipe()  # JSON values, as the checkpoints store them
    assert (recipe["epochs"], recipe["lr"], recipe["milestones"]) == (2, 0.1, [0.5])
    with pytest.raises(UsageError, match="--resume continues the run in --output and --overwrite deletes it"):
        train(digits_config(tmp_path, resume=True, overwrite=True))


def test_a_run_that_fails_in_its_first_epoch_leaves_the_folder_reusable(tmp_path):
    with pytest.raises(TrainingDivergedError):
        train(digits_config(tmp_path, lr=1e6, epochs=1))
    assert list(tmp_path.iterdir()) == []  # so the same command with a lower lr needs no --overwrite
    assert train(digits_config(tmp_path, epochs=1, export=False))["epochs"] == 1


# -- one run per folder, resume settings, timeouts, full disks, leftovers (issue 17) --------------------------------


def test_a_second_run_into_a_locked_output_is_refused_naming_the_holder(tmp_path, capsys):
    with train_module.output_lock(tmp_path):
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started "
        with pytest.raises(UsageError, match=rf"--output {tmp_path} is in use by another train run \({holder}"):
            train(digits_config(tmp_path))
        assert main(["train", "--output", str(tmp_path), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert "is in use by another train run" in error and holder in error and len(error.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    with train_module.output_lock(tmp_path):  # free again
        pass


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_released(tmp_path):
    """A run killed with SIGKILL cannot remove its lock file: the OS drops the lock, and the next run takes it."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from densenet_efficient.tools.train import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageError, match=rf"in use by another train run \(pid {holder.pid} on "):
            train(digits_config(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    assert (tmp_path / train_module.LOCK_FILENAME).exists()  # left behind by the killed run, but not locked
    with train_module.output_lock(tmp_path):
        pass


def test_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: calls.append(options))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for timeout, expected in ((None, 600), (5.0, 5)):
        with distributed("cpu", *(() if timeout is None else (timeout,))):
            pass
        assert calls.pop()["timeout"] == datetime.timedelta(seconds=expected)
    assert TrainConfig().timeout == 600


def test_what_holds_the_group_is_collected_before_its_teardown(monkeypatch):
    """DistributedDataParallel sits in a reference cycle: the group's teardown collects it first, instead of
    leaving its gloo objects to the interpreter's exit (a SIGABRT there)."""
    import gc
    import weakref

    import torch.distributed as dist

    class Cyclic:
        pass

    alive_at_teardown = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: None)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: alive_at_teardown.append(user() is not None))
    monkeypatch.setenv("WORLD_SIZE", "2")
    gc.disable()  # only the teardown's own collection may free the cycle
    try:
        with distributed("cpu"):
            cycle = Cyclic()
            cycle.self = cycle
            user = weakref.ref(cycle)
            del cycle
            assert user() is not None
    finally:
        gc.enable()
    assert alive_at_teardown == [False]


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeout_must_be_positive(tmp_path, capsys, value):
    assert main(["train", "--output", str(tmp_path), "--timeout", value]) == 2
    assert "timeout must be a finite number of seconds above 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _hanging_worker(rank: int, port: int, result_dir: str) -> None:
    """Rank 1 joins the group and then stops answering; rank 0's barrier must fail within the timeout."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    with distributed("cpu", timeout=3) as ctx:
        if rank == 1:
            time.sleep(30)
            return
        started = time.monotonic()
        try:
            ctx.barrier()
        except RuntimeError as error:
            (Path(result_dir) / "rank0.txt").write_text(f"{time.monotonic() - started:.1f} {error}")


@pytest.mark.slow
def test_a_worker_that_stops_answering_fails_the_others_within_the_timeout(tmp_path):
    context = mp.spawn(_hanging_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = 25
    while not (tmp_path / "rank0.txt").exists() and deadline > 0:
        context.join(timeout=1)
        deadline -= 1
    for process in context.processes:
        process.kill()
    waited, _, message = (tmp_path / "rank0.txt").read_text().partition(" ")
    assert float(waited) < 15 and message  # gloo's own default would wait 30 minutes


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A 1-epoch run, efficient=True, one process."""
    output = tmp_path_factory.mktemp("one_epoch")
    with one_thread():
        train(digits_config(output, epochs=1, export=False))
    return output


def test_eval_shows_progress_on_stderr_that_is_not_a_terminal(one_epoch, capsys):
    """`eval` in CI or behind `| tee` (stderr not a terminal): a line at the start and about every tenth batch."""
    weights = str(one_epoch / "best.safetensors")
    assert main(["eval", "densenet_bc_100_k12", "--weights", weights, "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("eval: digits (test): 23 batches of up to 16 on cpu [")
    assert [line.split(" [")[0] for line in lines[1:]] == [
        f"eval: batch {n}/23" for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 23)
    ]
    assert all(line.endswith("]") for line in lines) and "left]" in lines[1]
    assert json.loads(captured.out)["images"] == 359


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


@pytest.mark.filterwarnings("ignore:extending the run")
def test_resume_in_another_memory_mode_warns_that_it_is_not_bit_exact(one_epoch, tmp_path):
    output = _copy(one_epoch, tmp_path / "run")
    assert load_checkpoint(checkpoints(output)[-1])[1]["execution"] == {
        "efficient": True,
        "world_size": 1,
        "sync_bn": False,
    }
    with pytest.warns(UserWarning, match=r"\(efficient=True\) with efficient=False: .*not bit-identically"):
        train(digits_config(output, epochs=2, efficient=False, export=False, resume=True))


@pytest.mark.parametrize(
    "recorded, listing",
    [
        ({"world_size": 2}, "another world_size (world_size: checkpoint 2, now 1)"),
        ({"world_size": 2, "sync_bn": True}, "another world_size and sync_bn"),
    ],
)
def test_resume_with_another_world_size_or_sync_bn_is_refused(one_epoch, tmp_path, recorded, listing):
    output = _copy(one_epoch, tmp_path / "run")
    path = checkpoints(output)[-1]
    state = torch.load(path, weights_only=True)
    state["execution"].update(recorded)  # as a 2-process run would have written it
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=re.escape(listing) + ".*--weights .*epoch-0001.safetensors"):
        train(digits_config(output, epochs=2, export=False, resume=True))


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno

    real_fdopen = os.fdopen

    monkeypatch.setattr(os, "fdopen", lambda handle, mode: FullDiskFile(real_fdopen(handle, mode)))
    with pytest.raises(OSError, match=r"cannot write .*epoch-0003.safetensors: No space left on device") as error:
        train_module.save_checkpoint(tmp_path, b"weights", {"epoch": 3}, keep=2)
    assert error.value.errno == errno.ENOSPC
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == []  # no temporary file left


def test_temporaries_of_a_killed_write_are_removed_by_the_next_run_and_nothing_else(tmp_path):
    import fcntl

    checkpoints_dir = tmp_path / "checkpoints"
    checkpoints_dir.mkdir()
    stale = [tmp_path / ".metrics.csv.k2j3.tmp", checkpoints_dir / ".epoch-0002.pt.a8f1.tmp"]
    kept = [tmp_path / ".notes.txt.x1.tmp", tmp_path / "draft.tmp", checkpoints_dir / ".epoch-0003.pt.live.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    with open(kept[-1], "rb") as live:  # a writer in progress holds its temporary file locked
        fcntl.flock(live, fcntl.LOCK_EX)
        train_module.prepare_output(digits_config(tmp_path, resume=True).resolved())
    assert [path.exists() for path in stale + kept] == [False, False, True, True, True]


# -- fail-closed input and output -----------------------------------------------------------------------------------


def test_a_dataset_with_one_class_is_refused_before_training(tmp_path, monkeypatch, capsys):
    _digits_imagefolder(tmp_path / "images", range(1))
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, epoch: pytest.fail("training started"))
    args = ["train", "--dataset", "imagefolder", "--data", str(tmp_path / "images"), "--image-size", "8"]
    assert main([*args, "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "1 class" in line and "at least 2" in line
    assert not any(p.name != train_module.LOCK_FILENAME for p in (tmp_path / "run").rglob("*") if p.is_file())


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    original = Trainer._train_epoch

    def interrupted_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted_in_epoch_2)
    args = ["train", "--output", str(tmp_path / "run"), "--image-size", "8", "--epochs", "2", "--no-progress"]
    args += ["--model-arg", "block_config=1,1,1", "--no-export"]
    assert main(args) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "interrupted" in line and "--resume" in line
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert main([*args, "--resume"]) == 0
    assert [p.name for p in checkpoints(tmp_path / "run")][-1] == "epoch-0002.pt"


def test_overwrite_removes_a_linked_checkpoint_folder_not_what_it_links_to(one_epoch, tmp_path):
    output = _copy(one_epoch, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(output / "checkpoints", elsewhere)
    (output / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = {path.name: path.read_bytes() for path in elsewhere.iterdir()}
    train(digits_config(output, epochs=1, export=False, overwrite=True))
    assert {path.name: path.read_bytes() for path in elsewhere.iterdir()} == before
    assert not (output / "checkpoints").is_symlink() and checkpoints(output)


def test_a_checkpoint_swapped_after_its_check_is_not_read(one_epoch, tmp_path, monkeypatch):
    """The model file is hashed and deserialised from the same bytes: replacing the file once its hash is taken
    (another run's weights) changes nothing that load_checkpoint returns."""
    (path,) = checkpoints(one_epoch)
    expected = load_checkpoint(path)[0]
    model_path = path.with_suffix(".safetensors")
    other = dict(expected, **{"classifier.bias": expected["classifier.bias"] + 1})
    import safetensors.torch

    other_bytes = safetensors.torch.save(other)
    real_sha256 = hashlib.sha256

    class SwapAfterHashing:
        def __init__(self, data=b""):
            self.hash = real_sha256(data)

        def update(self, data):
            self.hash.update(data)

        def hexdigest(self):
            model_path.write_bytes(other_bytes)  # the check is done: the file changes now
            return self.hash.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    loaded = load_checkpoint(path)[0]
    assert model_path.read_bytes() == other_bytes  # the swap happened
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
