"""The trainer and `eval`: memory modes, DDP, exact resume, safe checkpoints and output folders, fine-tuning.

Runs are tiny (a DenseNet-BC with one layer per block, 8 px, one thread) on the first 400 digits (288 training
images: 9 steps of 32), so the file stays fast; only the accuracy, DDP and subprocess tests are slow.
"""

from __future__ import annotations

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

from densenet_efficient.pretrained import loading
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

sklearn_datasets = pytest.importorskip("sklearn.datasets")

TINY = {"block_config": (1, 1, 1), "growth_rate": 12, "num_init_features": 24}
ALL_DIGITS = sklearn_datasets.load_digits()
FEW = 400  # digits in most tests: 80 test, 32 validation, 288 training images


def few_digits():
    import sklearn.utils

    d = ALL_DIGITS
    return sklearn.utils.Bunch(images=d.images[:FEW], target=d.target[:FEW], target_names=d.target_names)


@pytest.fixture(autouse=True, scope="module")
def _few_digits_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sklearn_datasets, "load_digits", few_digits)
        yield
    torch.set_num_threads(threads)


def digits_config(output: Path, **overrides) -> TrainConfig:
    options = dict(model="densenet_bc_100_k12", model_args=dict(TINY), image_size=8, epochs=2, batch_size=32)
    return TrainConfig(**{**options, "workers": 0, "progress": False, "output": str(output), **overrides})


def final_state(output: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoints(output)[-1])[0]


def untimed(history):
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]


def interrupt_epoch(monkeypatch, index: int) -> None:
    """Ctrl-C (or SIGKILL: nothing after the last checkpoint runs) at the start of epoch ``index`` (0-based)."""
    original = Trainer._train_epoch

    def interrupted(self, epoch):
        if epoch == index:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)


# -- accuracy and memory modes --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_reach_90_percent(tmp_path, monkeypatch):
    monkeypatch.setattr(sklearn_datasets, "load_digits", lambda: ALL_DIGITS)
    results = train(digits_config(tmp_path, image_size=16, epochs=6, export=False))
    history = load_checkpoint(checkpoints(tmp_path)[-1])[1]["history"]
    assert results["test"]["images"] == 359 and results["test"]["top1"] > 90, results
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]


def test_every_memory_mode_follows_the_same_loss_curve(tmp_path):
    """At lr 0.001 (SGD on this tiny net amplifies rounding-level differences at larger rates) the modes agree."""
    histories = {}
    for mode in (False, True, "max"):
        train(digits_config(tmp_path / str(mode), efficient=mode, lr=0.001, export=False))
        histories[mode] = load_checkpoint(checkpoints(tmp_path / str(mode))[-1])[1]["history"]
    for mode in (True, "max"):
        for key in ("train_loss", "val_loss"):
            expected = torch.tensor([row[key] for row in histories[False]], dtype=torch.float64)
            actual = torch.tensor([row[key] for row in histories[mode]], dtype=torch.float64)
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=0, msg=f"{mode}: {key}")
    assert histories[False][-1]["train_loss"] < histories[False][0]["train_loss"]


# -- distributed data parallel --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, configs: dict[str, TrainConfig], result_dir: str) -> None:
    """One torchrun-like process of a 2-process gloo group: each config's run, then its parameters and buffers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch, distributed(None) as ctx:
        patch.setattr(sklearn_datasets, "load_digits", few_digits)
        for name, config in configs.items():
            trainer = Trainer(config.resolved(), ctx)
            results = trainer.fit()
            state = {"params": dict(trainer.model.named_parameters()), "buffers": dict(trainer.model.named_buffers())}
            state = {group: {k: v.detach() for k, v in values.items()} for group, values in state.items()}
            torch.save({**state, "results": results}, Path(result_dir) / f"{name}-rank{rank}.pt")
            del trainer


@pytest.mark.slow
def test_two_processes_match_one_process_plain_and_with_sync_bn_in_every_mode(tmp_path):
    """Plain DDP equals one process with 2 accumulation steps (the same micro-batches); --sync-bn normalises with
    both halves' statistics, so it equals one process on the whole batch, in every memory mode. Few steps for
    sync_bn (val_fraction 0.8): over many, the statistics' summation order shows as in the memory modes."""
    ddp = {"plain": digits_config(tmp_path / "plain", epochs=1)}
    for mode in (False, True, "max"):
        ddp[str(mode)] = digits_config(tmp_path / str(mode), epochs=1, efficient=mode, val_fraction=0.8, sync_bn=True)
    mp.spawn(_ddp_worker, args=(_free_port(), ddp, str(tmp_path)), nprocs=2, join=True)
    for name, config in ddp.items():
        ranks = [torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True) for rank in range(2)]
        assert ranks[0]["results"]["test"] == ranks[1]["results"]["test"]
        groups = ("params",) if name == "plain" else ("params", "buffers")
        single = {"accum_steps": 2} if name == "plain" else {"sync_bn": False}
        train(TrainConfig(**{**vars(config), "output": str(tmp_path / f"single-{name}"), **single}))
        expected = final_state(tmp_path / f"single-{name}")
        for group in groups:
            for key, value in ranks[0][group].items():
                assert torch.equal(value, ranks[1][group][key]), f"{name}: {key} differs between ranks"
                torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        assert ranks[0]["params"]["classifier.weight"].abs().sum() > 0


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
    finally:
        gc.enable()
    assert alive_at_teardown == [False]


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


# -- checkpoints and resume -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 4-epoch run (lr 0.1, 0.1, 0.01, 0.001) and its results."""
    output = tmp_path_factory.mktemp("uninterrupted")
    return output, train(digits_config(output, epochs=4))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_resume_after_a_crash_equals_the_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
    reference_dir, reference = uninterrupted
    interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(tmp_path, epochs=4))
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0001.pt", "epoch-0002.pt"]
    monkeypatch.undo()
    resumed = train(digits_config(tmp_path, epochs=4, resume=True))
    assert resumed["test"] == reference["test"]
    expected_state, expected = load_checkpoint(checkpoints(reference_dir)[-1])
    actual_state, actual = load_checkpoint(checkpoints(tmp_path)[-1])
    assert [row["lr"] for row in actual["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    for key in ("epoch", "scheduler", "best"):
        assert actual[key] == expected[key], key
    assert untimed(actual["history"]) == untimed(expected["history"])
    for name, value in expected_state.items():
        assert torch.equal(actual_state[name], value), name


@pytest.mark.parametrize(
    "option, value, listing",
    [("lr", 0.05, "lr: checkpoint 0.1, now 0.05"), ("accum_steps", 2, "accum_steps: checkpoint 1, now 2")]
    + [("amp", "bf16", "amp: checkpoint None, now 'bf16'")],
)
def test_resume_refuses_another_recipe(uninterrupted, option, value, listing):
    with pytest.raises(CheckpointError, match=rf"another recipe \({re.escape(listing)}\)"):
        train(digits_config(uninterrupted[0], epochs=4, resume=True, **{option: value}))


def test_resume_with_more_epochs_extends_the_run_with_the_new_schedule(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    with pytest.raises(UsageError, match=r"epoch-0004.pt is at epoch 4: resume it with --epochs 4 or more"):
        train(digits_config(output, epochs=3, resume=True))
    with pytest.warns(
        UserWarning, match=r"from 4 to 8 epochs: .*schedule of 8 epochs \(milestones \[4, 6\], lr now 0.01"
    ):
        results = train(digits_config(output, epochs=8, resume=True))
    _, state = load_checkpoint(checkpoints(output)[-1])
    # epochs 1-4 keep the 4-epoch schedule; 5-8 follow the 8-epoch one (x0.1 after epochs 4 and 6)
    assert [row["lr"] for row in state["history"]] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.01, 0.01, 0.001, 0.001])
    assert results["epochs"] == 8 and state["config"]["epochs"] == 8


def test_truncated_or_corrupt_checkpoint_is_refused_and_the_previous_one_survives(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    newest, previous = checkpoints(output)[-1], output / "checkpoints" / "epoch-0003.pt"
    good_state = newest.read_bytes()
    newest.write_bytes(good_state[: len(good_state) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        train(digits_config(output, epochs=4, resume=True))
    assert f"--resume {previous}" in str(error.value)
    assert load_checkpoint(previous)[1]["epoch"] == 3
    newest.write_bytes(good_state)
    weights = newest.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor: safetensors alone would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(newest)


def test_a_checkpoint_swapped_after_its_check_is_not_read(uninterrupted, monkeypatch):
    """The model file is hashed and deserialised from the same bytes: replacing it once its hash is taken changes
    nothing that load_checkpoint returns."""
    import safetensors.torch

    path = checkpoints(uninterrupted[0])[-1]
    model_path = path.with_suffix(".safetensors")
    original = model_path.read_bytes()
    expected = load_checkpoint(path)[0]
    other_bytes = safetensors.torch.save(dict(expected, **{"classifier.bias": expected["classifier.bias"] + 1}))
    real_sha256 = hashlib.sha256

    class SwapAfterHashing:
        def __init__(self, data=b""):
            self.hash = real_sha256(data)

        def hexdigest(self):
            model_path.write_bytes(other_bytes)  # the check is done: the file changes now
            return self.hash.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", SwapAfterHashing)
    try:
        loaded = load_checkpoint(path)[0]
        assert model_path.read_bytes() == other_bytes  # the swap happened
    finally:
        model_path.write_bytes(original)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_an_interrupted_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    original_replace = os.replace

    def interrupted_after_epoch_1(source, target):
        if str(target).endswith("epoch-0002.pt"):
            raise KeyboardInterrupt  # Ctrl-C after the temporary file was written, before the rename
        original_replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(tmp_path))
    monkeypatch.undo()
    files = ["config.json", "epoch-0001.pt", "epoch-0001.safetensors", "epoch-0002.safetensors"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == files
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch-0001.pt"]
    assert train(digits_config(tmp_path, resume=True, export=False))["epochs"] == 2


def test_best_weights_are_the_best_checkpoints_whatever_the_file_holds(uninterrupted, tmp_path, monkeypatch):
    """best.safetensors replaced by another epoch's weights, removed, or never replaced (killed between the
    checkpoint and it): the end of the run writes and exports the best epoch's checkpointed weights."""
    from safetensors.torch import load_file

    output = copy_run(uninterrupted[0], tmp_path / "run")
    _, state = load_checkpoint(checkpoints(output)[-1])
    best, kept = output / "best.safetensors", output / "checkpoints" / f"epoch-{state['best']['epoch']:04d}.safetensors"
    for damage in (lambda: shutil.copy(checkpoints(output)[-1].with_suffix(".safetensors"), best), best.unlink):
        damage()
        assert train(digits_config(output, epochs=4, resume=True))["test"] == uninterrupted[1]["test"]
        assert best.read_bytes() == kept.read_bytes()
    exported = load_file(output / "export" / "model.safetensors")
    assert all(torch.equal(exported[key], value) for key, value in load_file(kept).items())


def test_two_runs_into_one_folder_killed_and_resumed_export_the_second_runs_best(uninterrupted, tmp_path, monkeypatch):
    """A finished run, a second run into the same folder (only with --overwrite) killed after its first epoch,
    then --resume: the results and the export are the second run's own."""
    from safetensors.torch import load_file

    output = copy_run(uninterrupted[0], tmp_path / "run")
    (output / "notes.txt").write_text("kept")  # not a run file: --overwrite leaves it
    interrupt_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(digits_config(output, epochs=2, seed=1, overwrite=True))
    assert [p.name for p in checkpoints(output)] == ["epoch-0001.pt"]
    assert not (output / "results.json").exists() and (output / "notes.txt").read_text() == "kept"
    monkeypatch.undo()
    results = train(digits_config(output, epochs=2, seed=1, resume=True))
    _, state = load_checkpoint(checkpoints(output)[-1])
    assert results["best_epoch"] == state["best"]["epoch"] and results["epochs"] == 2
    exported = load_file(output / "export" / "model.safetensors")
    best_epoch = load_file(output / "checkpoints" / f"epoch-{state['best']['epoch']:04d}.safetensors")
    assert exported.keys() == best_epoch.keys() and all(torch.equal(exported[k], best_epoch[k]) for k in exported)


# -- command line, export, eval and fine-tuning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`densenet-efficient train` on digits (3 epochs, 16 px, efficient=max) with the export at the end."""
    output = tmp_path_factory.mktemp("cli")
    args = ["train", "--output", str(output), "--image-size", "16", "--epochs", "3", "--no-progress"]
    assert main([*args, "--model-arg", "block_config=1,1,1", "--efficient", "max"]) == 0
    return output


def test_cli_train_writes_log_plot_results_and_export(cli_run):
    rows = (cli_run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "lr", "train_loss", "train_top1"] and len(rows) == 4
    assert (cli_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((cli_run / "results.json").read_text())
    assert results["test"]["images"] == 80
    config = json.loads((cli_run / "export" / "config.json").read_text())
    assert config["architecture"] == "densenet_bc_100_k12"
    assert config["model_args"]["block_config"] == [1, 1, 1]
    assert config["pretrained_cfg"]["input_size"] == [1, 16, 16]
    entry = json.loads((cli_run / "manifest_entry.json").read_text())
    assert entry["metrics"][0]["top1"] == round(results["test"]["top1"], 3)
    assert entry["hub"]["size"] == (cli_run / "export" / "model.safetensors").stat().st_size


def test_eval_reproduces_the_test_accuracy_from_the_export_the_best_weights_and_a_checkpoint(cli_run, tmp_path):
    expected = json.loads((cli_run / "results.json").read_text())["test"]
    best_epoch = json.loads((cli_run / "results.json").read_text())["best_epoch"]
    for weights in ("export", "best.safetensors", f"checkpoints/epoch-{best_epoch:04d}.safetensors"):
        report = tmp_path / "eval.json"
        assert main(["eval", "densenet_bc_100_k12", "--weights", str(cli_run / weights), "--json", str(report)]) == 0
        evaluated = json.loads(report.read_text())
        assert evaluated["images"] == expected["images"]
        assert (evaluated["top1"], evaluated["top5"]) == pytest.approx((expected["top1"], expected["top5"]))


def test_eval_shows_progress_on_stderr_that_is_not_a_terminal(cli_run, capsys):
    """`eval` in CI or behind `| tee` (stderr not a terminal): a line at the start and one per tenth of the run."""
    assert main(["eval", "densenet_bc_100_k12", "--weights", str(cli_run / "export"), "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("eval: digits (test): 5 batches of up to 16 on cpu [")
    assert [line.split(" [")[0] for line in lines[1:]] == [f"eval: batch {n}/5" for n in range(1, 6)]
    assert all(line.endswith("]") for line in lines) and "left]" in lines[1]
    assert json.loads(captured.out)["images"] == 80


def _digits_imagefolder(root: Path, classes: range) -> None:
    """Write the digits of ``classes`` as 8x8 grayscale PNGs, one folder per class."""
    from PIL import Image

    digits = sklearn_datasets.load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label in classes:
            folder = root / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(folder / f"{index}.png")


def test_fine_tune_an_export_on_a_new_number_of_classes_reading_the_weights_once(cli_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _digits_imagefolder(tmp_path / "images", range(5))
    export = cli_run / "export"
    reads = []
    real_read = loading.read_state_dict
    monkeypatch.setattr(loading, "read_state_dict", lambda *args: reads.append(args[0]) or real_read(*args))
    config = TrainConfig(
        dataset="imagefolder",
        data=str(tmp_path / "images"),
        model="densenet_bc_100_k12",
        weights=str(export),
        freeze_backbone=True,
        epochs=3,
        batch_size=16,
        workers=0,
        progress=False,
        output=str(tmp_path / "fine-tuned"),
    )
    with pytest.warns(UserWarning, match="10 classes, the model 5"):
        results = train(config)
    assert len(reads) == 1  # preprocessing and model from one read of the weights
    assert results["test"]["top1"] > 40, results  # 5 classes: chance is 20%
    pretrained = load_file(export / "model.safetensors")
    tuned = load_file(tmp_path / "fine-tuned" / "export" / "model.safetensors")
    assert tuned["classifier.weight"].shape == (5, pretrained["classifier.weight"].shape[1])
    backbone = [key for key in pretrained if not key.startswith("classifier.")]
    assert backbone and all(torch.equal(tuned[key], pretrained[key]) for key in backbone)
    assert results["test"]["images"] == len(build_splits("imagefolder", tmp_path / "images").test)


def test_resume_does_not_repeat_the_warnings_of_weights_it_replaces(cli_run, tmp_path):
    _digits_imagefolder(tmp_path / "images", range(5))
    weights = str(cli_run / "best.safetensors")
    config = dict(dataset="imagefolder", data=str(tmp_path / "images"), weights=weights, image_size=8, export=False)
    with pytest.warns(UserWarning, match="10 classes, the model 5"):
        train(digits_config(tmp_path / "run", **config, epochs=1, batch_size=16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(digits_config(tmp_path / "run", **config, epochs=2, batch_size=16, resume=True))
    assert not [w for w in caught if "classes" in str(w.message)], [str(w.message) for w in caught]


# -- bad input and runs that cannot end "successfully" with a broken result -----------------------------------------


def test_missing_cifar_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--download"):
        build_splits("cifar10", tmp_path)


@pytest.mark.parametrize(("batch_size", "said"), [(40, "trains on 280 of the 288 training images"), (48, None)])
def test_images_an_epoch_leaves_out_are_said(tmp_path, capsys, batch_size, said):
    """Full batches only (drop_last): an incomplete last batch's images are said to be left out, not dropped
    silently; a batch size dividing the training set leaves none out and says nothing. Slow steps show their rate
    (not "0 img/s")."""
    train(digits_config(tmp_path, epochs=1, batch_size=batch_size, export=False))
    out = capsys.readouterr().out
    assert (said is None) == ("left out" not in out) and (said is None or said in out and "other 8" in out)
    assert "images_per_s 0.0421" in train_module._epoch_line({"epoch": 1, "images_per_s": 0.0421})


def test_optimizer_in_backward_trains_the_same_weights_and_checkpoints(tmp_path):
    states = []
    for fused in (False, True):
        train(digits_config(tmp_path / str(fused), efficient="max", export=False, optimizer_in_backward=fused))
        model_state, state = load_checkpoint(checkpoints(tmp_path / str(fused))[-1])
        states.append((model_state, state["optimizer"], untimed(state["history"])))
    (model, optimizer, history), (fused_model, fused_optimizer, fused_history) = states
    assert all(torch.equal(fused_model[key], value) for key, value in model.items())
    assert fused_optimizer["param_groups"] == optimizer["param_groups"]  # the scheduler's learning rate
    for index, entry in optimizer["state"].items():
        assert torch.equal(fused_optimizer["state"][index]["momentum_buffer"], entry["momentum_buffer"])
    assert fused_history == history


def _no_data(monkeypatch) -> None:
    monkeypatch.setattr(train_module, "build_splits", lambda *a, **k: pytest.fail("data loaded before the check"))


@pytest.mark.parametrize("option, value, world", [("accum_steps", 2, "1"), ("amp", "fp16", "1"), ("epochs", 2, "2")])
def test_optimizer_in_backward_refuses_what_it_cannot_step_exactly(tmp_path, monkeypatch, option, value, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    _no_data(monkeypatch)
    with pytest.raises(UsageError, match="--optimizer-in-backward.*accum-steps.*fp16.*several processes"):
        train(digits_config(tmp_path / "run", optimizer_in_backward=True, **{option: value}))
    assert not (tmp_path / "run").exists()


def test_batch_must_split_evenly_into_accumulation_steps(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size 32 must be divisible by .* \(1 x 3 = 3\)"):
        train(digits_config(tmp_path, accum_steps=3))
    assert not (tmp_path / "checkpoints").exists()


def test_a_non_finite_loss_stops_the_run_writes_nothing_and_leaves_the_folder_reusable(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"diverged in epoch 1: the training loss is (nan|inf) \(lr 1e\+06"):
        train(digits_config(tmp_path, lr=1e6, epochs=1))
    assert [p.name for p in tmp_path.iterdir()] == [train_module.LOCK_FILENAME]  # so the same command can rerun
    assert train(digits_config(tmp_path, epochs=1, export=False))["epochs"] == 1


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", float("nan"), "lr must be a finite number above 0, got nan"),
        ("lr", float("inf"), "lr must be a finite number above 0, got inf"),
        ("gamma", -5.0, r"gamma must be a finite number in \(0, 1\], got -5.0"),
        ("momentum", 1.5, r"momentum must be a finite number in \[0, 1\), got 1.5"),
        ("weight_decay", float("nan"), "weight_decay must be a finite number of at least 0, got nan"),
        ("val_fraction", 1.0, r"val_fraction must be a finite number in \[0, 1\), got 1.0"),
        ("milestones", (0.5, float("nan")), r"milestones are fractions of the epochs in \(0, 1\], got \(0.5, nan\)"),
        ("epochs", 0, "epochs must be a whole number of at least 1, got 0"),
        ("batch_size", 2.5, "batch_size must be a whole number of at least 1, got 2.5"),
        ("workers", -1, "workers must be a whole number of at least 0, got -1"),
        ("momentum", 0.0, "Nesterov momentum needs a momentum above 0: pass --no-nesterov"),
        ("overwrite", True, "--resume continues the run in --output and --overwrite deletes it"),
    ],
)
def test_options_are_checked_before_anything_is_built(tmp_path, monkeypatch, option, value, message):
    _no_data(monkeypatch)
    with pytest.raises(UsageError, match=message):
        train(digits_config(tmp_path / "run", resume=option == "overwrite", **{option: value}))
    assert not (tmp_path / "run").exists()


def test_numpy_numbers_are_accepted(tmp_path):
    import numpy as np

    config = digits_config(tmp_path, epochs=np.int64(2), lr=np.float64(0.1), milestones=(np.float64(0.5),))
    recipe = config.resolved().recipe()  # JSON values, as the checkpoints store them
    assert (recipe["epochs"], recipe["lr"], recipe["milestones"]) == (2, 0.1, [0.5])


def test_output_that_is_a_file_or_cannot_be_written_fails_before_training(tmp_path, monkeypatch):
    _no_data(monkeypatch)
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(UsageError, match=f"--output {file} is a file, not a folder"):
        train(digits_config(file))
    with pytest.raises(UsageError, match=f"--output {file / 'run'} cannot be written to: Not a directory"):
        train(digits_config(file / "run"))


def test_a_non_empty_output_needs_resume_or_overwrite(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")

    def files():  # the run's files (the lock file names each holder in turn)
        return {p: p.read_bytes() for p in output.rglob("*") if p.is_file() and p.name != train_module.LOCK_FILENAME}

    before = files()
    with pytest.raises(UsageError, match=f"--output {output} is not empty: pass --resume .* --overwrite"):
        train(digits_config(output, epochs=1))
    assert files() == before


def test_overwrite_removes_linked_checkpoint_and_export_folders_not_what_they_link_to(uninterrupted, tmp_path):
    output = copy_run(uninterrupted[0], tmp_path / "run")
    before = {}
    for name in ("checkpoints", "export"):
        shutil.move(output / name, tmp_path / name)
        (output / name).symlink_to(tmp_path / name, target_is_directory=True)
        before[name] = {path.name: path.read_bytes() for path in (tmp_path / name).iterdir()}
    train(digits_config(output, epochs=1, overwrite=True))
    for name in ("checkpoints", "export"):
        assert {path.name: path.read_bytes() for path in (tmp_path / name).iterdir()} == before[name]
        assert not (output / name).is_symlink() and (output / name).is_dir()


def test_a_dataset_with_one_class_is_refused_before_training(tmp_path, monkeypatch, capsys):
    _digits_imagefolder(tmp_path / "images", range(1))
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, epoch: pytest.fail("training started"))
    args = ["train", "--dataset", "imagefolder", "--data", str(tmp_path / "images"), "--image-size", "8"]
    assert main([*args, "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "1 class" in line and "at least 2" in line
    assert not any(p.name != train_module.LOCK_FILENAME for p in (tmp_path / "run").rglob("*"))


def test_ctrl_c_prints_one_line_exits_130_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    interrupt_epoch(monkeypatch, 1)
    args = ["train", "--output", str(tmp_path / "run"), "--image-size", "8", "--epochs", "2", "--no-progress"]
    args += ["--model-arg", "block_config=1,1,1", "--no-export"]
    assert main(args) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "interrupted" in line and "--resume" in line
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert [p.name for p in checkpoints(tmp_path / "run")][-1] == "epoch-0002.pt"


# -- one run per folder, resume settings, full disks, leftovers ------------------------------------------------------


def test_a_second_run_into_a_locked_output_is_refused_naming_the_holder(tmp_path, capsys):
    with train_module.output_lock(tmp_path):
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started "
        with pytest.raises(UsageError, match=rf"--output {tmp_path} is in use by another train run \({holder}"):
            train(digits_config(tmp_path))
        assert main(["train", "--output", str(tmp_path), "--no-progress"]) == 2
        error = capsys.readouterr().err.strip()
        assert "is in use by another train run" in error and holder in error and len(error.splitlines()) == 1
    with train_module.output_lock(tmp_path):  # free again; the lock file alone is no run's file
        train_module.prepare_output(digits_config(tmp_path).resolved())


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_released(tmp_path):
    """A run killed with SIGKILL cannot release its lock: the OS drops it, and the next run takes it."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom pathlib import Path\nfrom densenet_efficient.tools.train import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(UsageError, match=rf"in use by another train run \(pid {holder.pid} on "):
            train(digits_config(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    with train_module.output_lock(tmp_path):
        pass


@pytest.mark.parametrize("value", ["0", "nan"])
def test_timeout_must_be_positive(tmp_path, capsys, value):
    assert main(["train", "--output", str(tmp_path), "--timeout", value]) == 2
    assert "timeout must be a finite number of seconds above 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    output = tmp_path_factory.mktemp("one_epoch")
    train(digits_config(output, epochs=1, export=False))
    return output


@pytest.mark.filterwarnings("ignore:extending the run")
def test_resume_in_another_memory_mode_warns_that_it_is_not_bit_exact(one_epoch, tmp_path):
    output = copy_run(one_epoch, tmp_path / "run")
    with pytest.warns(UserWarning, match=r"\(efficient=True\) with efficient=False: .*not bit-identically"):
        train(digits_config(output, efficient=False, export=False, resume=True))


@pytest.mark.parametrize(
    "recorded, listing",
    [({"world_size": 2}, "another recipe (world_size: checkpoint 2, now 1)"), ({}, None)]
    + [({"world_size": 2, "sync_bn": True}, "world_size: checkpoint 2, now 1; sync_bn: checkpoint True, now False")],
)
def test_resume_with_another_world_size_or_sync_bn_is_refused(one_epoch, tmp_path, recorded, listing):
    """Refused where it changes what is computed; one process with and without sync_bn is the same run."""
    output = copy_run(one_epoch, tmp_path / "run")
    path = checkpoints(output)[-1]
    state = torch.load(path, weights_only=True)
    assert {key: state["config"][key] for key in ("world_size", "sync_bn")} == {"world_size": 1, "sync_bn": False}
    state["config"].update(recorded)  # as a 2-process run (with or without --sync-bn) would have written it
    torch.save(state, path)
    if listing is None:  # the checkpoint of a run without --sync-bn, resumed with it
        assert train(digits_config(output, epochs=1, export=False, resume=True, sync_bn=True))["epochs"] == 1
        return
    with pytest.raises(CheckpointError, match=re.escape(listing) + ".*--weights .*epoch-0001.safetensors"):
        train(digits_config(output, export=False, resume=True))


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda handle, mode: FullDiskFile(real_fdopen(handle, mode)))
    with pytest.raises(OSError, match=r"cannot write .*epoch-0003.safetensors: No space left on device") as error:
        train_module.save_checkpoint(tmp_path, b"weights", {"epoch": 3}, keep=2)
    assert error.value.errno == errno.ENOSPC
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no temporary file left


def test_the_best_epochs_checkpoint_outlives_keep_checkpoints(tmp_path):
    for epoch in (1, 2, 3):
        train_module.save_checkpoint(tmp_path, b"weights", {"epoch": epoch, "best": {"epoch": 1}}, keep=1)
    assert [path.name for path in checkpoints(tmp_path)] == ["epoch-0001.pt", "epoch-0003.pt"]


def test_temporaries_of_a_killed_write_are_removed_by_the_next_run_and_nothing_else(tmp_path):
    import fcntl

    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".metrics.csv.k2j3.tmp", tmp_path / "checkpoints" / ".epoch-0002.pt.a8f1.tmp"]
    kept = [
        tmp_path / ".notes.txt.x1.tmp",
        tmp_path / "draft.tmp",
        tmp_path / "checkpoints" / ".epoch-0003.pt.live.tmp",
    ]
    for path in stale + kept:
        path.write_bytes(b"x")
    with open(kept[-1], "rb") as live:  # a writer in progress holds its temporary file locked
        fcntl.flock(live, fcntl.LOCK_EX)
        train_module.prepare_output(digits_config(tmp_path, resume=True).resolved())
    assert [path.exists() for path in stale + kept] == [False, False, True, True, True]


# -- unreadable images -----------------------------------------------------------------------------------------------


def _damaged_images(folder: Path) -> list[Path]:
    """A truncated JPEG and a truncated PNG (real files cut in half) in ``folder``."""
    from PIL import Image

    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    damaged = []
    for name in ("cut.jpg", "cut.png"):
        path = folder / name
        noise.save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        damaged.append(path)
    return damaged


def test_unreadable_images_are_named_before_training(tmp_path, monkeypatch):
    _digits_imagefolder(tmp_path / "images", range(2))
    total = sum(1 for _ in (tmp_path / "images").rglob("*.png")) + 2
    jpeg, png = _damaged_images(tmp_path / "images" / "class1")
    with pytest.raises(
        UnreadableImagesError,
        match=rf"2 of {total} images cannot be read: .*{jpeg} \(OSError: .*truncated.*; .*{png} \(.*--bad-images skip",
    ):
        build_splits("imagefolder", tmp_path / "images")
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, epoch: pytest.fail("training started"))
    config = digits_config(tmp_path / "run", dataset="imagefolder", data=str(tmp_path / "images"))
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
