"""The trainer and `eval`: accuracy on digits in every memory mode, DDP, exact resume, safe checkpoints, fine-tuning.

Runs are tiny (a DenseNet-BC with one layer per block, 8 or 16 px digits, one thread) so the file stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from densenet_efficient.tools.cli import main
from densenet_efficient.tools.data import DatasetNotFoundError, build_splits
from densenet_efficient.tools.train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    checkpoints,
    distributed,
    load_checkpoint,
    train,
)

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
    options = dict(dataset="digits", model="densenet_bc_100_k12", model_args=dict(TINY), image_size=8, epochs=2,
                   batch_size=32, workers=0, progress=False, output=str(output))
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


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_digits_reach_90_percent_in_every_memory_mode(recipe_runs, mode):
    results, history = recipe_runs[mode]
    assert len(history) == 6
    assert results["test"]["images"] == 359
    assert results["test"]["top1"] > 90, results
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


@pytest.fixture(scope="module")
def low_lr_runs(tmp_path_factory) -> dict:
    """Two epochs at lr 0.01 in each mode. At lr 0.1 SGD on this tiny net is chaotic: rounding-level differences
    (the modes agree per step to float precision) grow to percents within an epoch; at lr 0.01 they stay small."""
    return run_every_mode(tmp_path_factory.mktemp("low-lr"), epochs=2, lr=0.01)


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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    with distributed(None) as ctx:
        trainer = Trainer(config.resolved(), ctx)
        results = trainer.fit()
        torch.save({"params": {k: v.detach() for k, v in trainer.model.named_parameters()},
                    "buffers": dict(trainer.model.named_buffers()), "results": results},
                   Path(result_dir) / f"rank{rank}.pt")


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
    for key in ("epoch", "best", "scheduler"):
        assert actual[key] == expected[key], key

    def untimed(history):
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]

    assert untimed(actual["history"]) == untimed(expected["history"])
    for name, value in expected_state.items():
        assert torch.equal(actual_state[name], value), name


def test_resume_refuses_another_recipe(uninterrupted):
    output, _ = uninterrupted
    with pytest.raises(CheckpointError, match=r"another recipe \(lr: checkpoint 0.1, now 0.05\)"):
        train(digits_config(output, epochs=4, lr=0.05, resume=True))


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
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0001.pt", "epoch-0001.safetensors",
                                                         "epoch-0002.safetensors"]
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0001.pt"]
    assert load_checkpoint(folder / "epoch-0001.pt")[1]["epoch"] == 1
    results = train(digits_config(tmp_path, epochs=2, resume=True))
    assert results["epochs"] == 2


# -- command line, export, eval and fine-tuning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`densenet-efficient train` on digits (3 epochs, 16 px) with the export at the end."""
    output = tmp_path_factory.mktemp("cli")
    args = ["train", "--output", str(output), "--image-size", "16", "--epochs", "3", "--no-progress",
            "--model-arg", "block_config=1,1,1", "--efficient", "max"]
    with one_thread():
        assert main(args) == 0
    return output


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
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        if label in classes:
            folder = root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(folder / f"{index}.png")


def test_fine_tune_an_export_on_a_new_number_of_classes(cli_run, tmp_path):
    _digits_imagefolder(tmp_path / "images", range(5))
    export = cli_run / "export"
    config = TrainConfig(dataset="imagefolder", data=str(tmp_path / "images"), model="densenet_bc_100_k12",
                         weights=str(export), freeze_backbone=True, epochs=3, batch_size=32, lr=0.1, workers=0,
                         progress=False, output=str(tmp_path / "fine-tuned"))
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


def test_batch_must_split_evenly_into_accumulation_steps(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 32 must be divisible by .* \(1 x 3 = 3\)"):
        train(digits_config(tmp_path, accum_steps=3))
    assert not (tmp_path / "checkpoints").exists()
