"""The ``densenet-efficient`` command (also ``python -m densenet_efficient``): each subcommand's module provides
``add_arguments(parser)`` and ``run(args) -> int``. An error is one line on stderr and exit status 2 (usage: argparse's
and :class:`~.common.UsageError`), 1 (any other failure) or 130 (Ctrl-C); ``--debug`` or
``DENSENET_EFFICIENT_DEBUG=1`` shows the traceback instead."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..core import list_models
from ..pretrained.files import env_flag
from .common import UsageError

DEBUG_ENV = "DENSENET_EFFICIENT_DEBUG"
# name -> (module in densenet_efficient.tools, one-line help, what it needs beyond the base install: the "tools" extra)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "models": ("cli", "list the model names", ()),
    "bench": ("bench", "peak memory and step time of each memory mode", ("tqdm", "matplotlib")),
    "plan": ("plan", "largest batch and deepest network within a memory budget", ()),
    "train": ("train", "train or fine-tune (digits, CIFAR, ImageFolder; torchrun)", ("tqdm", "matplotlib", "sklearn")),
    "eval": ("evaluate", "top-1/top-5 of a model's weights on a dataset", ("tqdm", "sklearn")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'densenet_bc*'")


def run(args: argparse.Namespace) -> int:
    print("\n".join(list_models(args.pattern)))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one line on errors, as every other error of the command (subcommands' parsers too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help shows the usage)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="densenet-efficient",
        description="Memory-efficient DenseNets: benchmark, plan, train, evaluate.",
        epilog="Exit status: 0 success, 1 failure, 2 usage error, 130 interrupted.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, text, _) in COMMANDS.items():
        module = importlib.import_module(f".{module_name}", __package__)
        subparser = subparsers.add_parser(name, help=text, description=text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    for each in (parser, *subparsers.choices.values()):  # SUPPRESS: `densenet-efficient --debug COMMAND` holds
        each.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=f"traceback ({DEBUG_ENV}=1)")
    return parser


def missing_requirements(command: str) -> list[str]:
    """The modules ``command`` needs that are not installed (they come with ``densenet-efficient[tools]``)."""
    return [name for name in COMMANDS[command][2] if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns its exit status (see the module docstring for errors)."""
    args = build_parser().parse_args(argv)
    prefix = f"densenet-efficient {args.command}:"
    if missing := missing_requirements(args.command):
        extra = "pip install 'densenet-efficient[tools]'"
        print(f"{prefix} error: needs {', '.join(missing)}, which is not installed: {extra}", file=sys.stderr)
        return 1
    try:
        debug = getattr(args, "debug", False) or env_flag(DEBUG_ENV)
    except ValueError as error:
        print(f"{prefix} error: {error}", file=sys.stderr)
        return 2
    if debug:
        return args.run(args)
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, and the shell's status for SIGINT
        kept = " (checkpoints written so far are kept: --resume continues the run)" if args.command == "train" else ""
        print(f"{prefix} interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as error:  # one line and an exit status; --debug shows the traceback
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        print(f"{prefix} error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
