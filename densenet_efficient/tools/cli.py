"""The ``densenet-efficient`` command (also ``python -m densenet_efficient``).

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from ..core import list_models

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("densenet_efficient.tools.cli", "list the model names"),
    "bench": ("densenet_efficient.tools.bench", "peak memory and step time of every memory mode, side by side"),
    "plan": ("densenet_efficient.tools.plan", "largest batch and deepest network that train within a memory budget"),
    "train": ("densenet_efficient.tools.train", "train or fine-tune a model (digits, CIFAR, any ImageFolder; torchrun)"),
    "eval": ("densenet_efficient.tools.evaluate", "top-1/top-5 of a model's weights on a dataset"),
}
# What each command needs beyond the base install: the "tools" extra.
TOOLS_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "bench": ("tqdm", "matplotlib"),
    "train": ("tqdm", "matplotlib", "sklearn"),
    "eval": ("sklearn",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'densenet_bc*'")


def run(args: argparse.Namespace) -> int:
    print("\n".join(list_models(args.pattern)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densenet-efficient", description="Memory-efficient DenseNets: benchmark, plan, train, evaluate."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def missing_requirements(command: str) -> list[str]:
    """The modules ``command`` needs that are not installed (they come with ``densenet-efficient[tools]``)."""
    return [name for name in TOOLS_REQUIREMENTS.get(command, ()) if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_requirements(args.command)
    if missing:
        print(f"densenet-efficient {args.command} needs {', '.join(missing)}, which is not installed: "
              "pip install 'densenet-efficient[tools]'", file=sys.stderr)
        return 1
    return args.run(args)
