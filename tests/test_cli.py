"""The densenet-efficient command itself: subcommands and what it says when the tools extra is missing."""

import importlib.util

import pytest

from densenet_efficient.tools import cli


def test_models_lists_matching_names(capsys):
    assert cli.main(["models", "densenet_bc*"]) == 0
    assert capsys.readouterr().out.split() == ["densenet_bc_100_k12", "densenet_bc_190_k40", "densenet_bc_250_k24"]


@pytest.mark.parametrize(("command", "missing"), [("train", "matplotlib"), ("bench", "tqdm"), ("eval", "sklearn")])
def test_missing_tools_extra_names_the_extra_to_install(command, missing, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    argv = [command] if command != "eval" else [command, "densenet_bc_100_k12"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == (f"densenet-efficient {command} needs {missing}, which is not installed: "
                   "pip install 'densenet-efficient[tools]'\n")


def test_plan_needs_only_the_base_install():
    assert cli.missing_requirements("plan") == []
