"""The `densenet-efficient` command: the tools extra, and its error contract: one line on stderr, exit 2 for
usage errors and 1 for failures, the traceback only with --debug or DENSENET_EFFICIENT_DEBUG=1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densenet_efficient.tools import cli
from densenet_efficient.tools.cli import DEBUG_ENV, main
from densenet_efficient.tools.common import UsageError

TINY_TRAIN = ["train", "--image-size", "8", "--epochs", "1", "--no-progress", "--model-arg", "block_config=1,1,1"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "nan", "lr must be a finite number above 0, got nan"),
        ("--gamma", "-5", "gamma must be a finite number in (0, 1], got -5.0"),
        ("--momentum", "inf", "momentum must be a finite number in [0, 1), got inf"),
    ],
)
def test_invalid_numbers_exit_2_with_one_line(tmp_path, capsys, monkeypatch, option, value, message):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert main([*TINY_TRAIN, "--output", str(tmp_path / "run"), option, value]) == 2
    line = one_line(capsys)
    assert line.startswith("densenet-efficient train: error:") and message in line and "--debug" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--epochs", "many"],
            "densenet-efficient train: error: argument --epochs: invalid int value: 'many'",
        ),
        (["bench", "--model", "nope"], "densenet-efficient bench: error: argument --model: Unknown model 'nope'"),
        (
            ["plan", "--memory", "1GB", "--model", "densenet121"],
            "densenet-efficient plan: error: argument --model: Unknown model 'densenet121'. Did you mean "
            "densenet121_efficient,",
        ),
        (["plan", "--batch-size", "0"], "densenet-efficient plan: error: argument --batch-size: expected an integer"),
        (["eval", "--no-such-option"], "densenet-efficient eval: error: the following arguments are required"),
        (["nope"], "densenet-efficient: error: argument COMMAND: invalid choice: 'nope'"),
        (["train", "--device", "cuda:7"], "densenet-efficient train: error: argument --device: device 'cuda:7' is not"),
        (["eval", "densenet_bc_100_k12", "--batch-size", "0"], "densenet-efficient eval: error: argument --batch-size"),
        # Output paths are checked before the benchmark runs, not when its results are written.
        (
            ["bench", "--json", "/no/such/folder/r.json"],
            "densenet-efficient bench: error: argument --json: cannot write",
        ),
        (["bench", "--csv", "."], "densenet-efficient bench: error: argument --csv: cannot write '.': it is a folder"),
        (["plan", "--memory", "1GB", "--json", "/no/such/p.json"], "densenet-efficient plan: error: argument --json"),
    ],
)
def test_argparse_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = one_line(capsys)
    assert exit_.value.code == 2 and err.startswith(message) and "usage:" not in err, err


def test_non_empty_output_exits_2_naming_resume_and_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    (tmp_path / "old.txt").write_text("a previous run")
    assert main([*TINY_TRAIN, "--output", str(tmp_path)]) == 2
    err = one_line(capsys)
    assert f"--output {tmp_path} is not empty: pass --resume" in err and "--overwrite" in err


def test_failures_exit_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert (
        main(["train", "--dataset", "cifar10", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "run")])
        == 1
    )
    assert one_line(capsys).startswith(f"densenet-efficient train: error: cifar10 not found in {tmp_path / 'none'}")
    assert main(["train", "--output", str(tmp_path / "run2"), "--resume"]) == 1
    assert "nothing to resume: no checkpoint in" in one_line(capsys)


def test_a_diverging_run_exits_1_and_writes_no_results(tmp_path, capsys, monkeypatch):
    """The issue's `train --lr 50`: it used to exit 0 and export NaN weights with a results.json of NaN."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert main([*TINY_TRAIN, "--output", str(tmp_path), "--lr", "1e6"]) == 1
    assert "error: training diverged in epoch 1: the training loss is" in one_line(capsys)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "export").exists()


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    for argv in (["--debug", *TINY_TRAIN], [*TINY_TRAIN, "--debug"]):
        with pytest.raises(UsageError, match="lr must be a finite number"):
            main([*argv, "--output", str(tmp_path / "run"), "--lr", "nan"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError, match="lr must be a finite number"):
        main([*TINY_TRAIN, "--output", str(tmp_path / "run"), "--lr", "nan"])


@pytest.mark.parametrize("value, status", [("false", 2), ("off", 2), ("no", 2), ("maybe", 2)])
def test_the_debug_switch_reads_off_as_off_and_refuses_other_words(tmp_path, monkeypatch, capsys, value, status):
    """DENSENET_EFFICIENT_DEBUG=false used to turn the traceback on: every spelling of off is off, and a word that
    is neither on nor off is one line naming the valid values."""
    monkeypatch.setenv(DEBUG_ENV, value)
    assert main([*TINY_TRAIN, "--output", str(tmp_path / "run"), "--lr", "nan"]) == status
    line = one_line(capsys)
    assert ("lr must be a finite number" in line) if value != "maybe" else (DEBUG_ENV in line and "on/off" in line)


@pytest.mark.slow
def test_the_installed_entry_point_returns_the_exit_status(tmp_path):
    """`python -m densenet_efficient` (as the console script): status 2 and one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "densenet_efficient", *TINY_TRAIN, "--output", str(tmp_path), "--gamma", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, DEBUG_ENV: ""},
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("densenet-efficient train: error: gamma must be a finite number in (0, 1]")


def test_models_lists_matching_names(capsys):
    assert cli.main(["models", "densenet_bc*"]) == 0
    assert capsys.readouterr().out.split() == ["densenet_bc_100_k12", "densenet_bc_190_k40", "densenet_bc_250_k24"]


@pytest.mark.parametrize(("command", "missing"), [("train", "matplotlib"), ("bench", "tqdm"), ("eval", "sklearn")])
def test_missing_tools_extra_names_the_extra_to_install(command, missing, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    argv = [command] if command != "eval" else [command, "densenet_bc_100_k12"]
    assert cli.main(argv) == 1
    line = one_line(capsys)
    assert line.startswith(f"densenet-efficient {command}: error: needs {missing}") and "[tools]" in line


def test_plan_needs_only_the_base_install():
    assert cli.missing_requirements("plan") == []
