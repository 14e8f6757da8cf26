"""Loading a saved folder against the floor: ``create_model(name, weights=folder)`` vs ``create_model(name)`` plus
``load_state_dict(safetensors.torch.load_file(...))``, interleaved, one thread, median of ``--rounds`` rounds.

    PYTHONPATH=. python benchmarks/load_folder.py [--model densenet121_efficient] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import densenet_efficient as de


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121_efficient")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        de.save_pretrained(de.create_model(args.model), folder)
        weights = Path(folder, "model.safetensors")

        def floor() -> None:
            de.create_model(args.model).load_state_dict(load_file(weights))

        def load() -> None:
            de.create_model(args.model, weights=folder)

        times: dict[str, list[float]] = {"floor": [], "load": []}
        floor(), load()  # warm-up: imports, caches
        for _ in range(args.rounds):
            for name, run in (("floor", floor), ("load", load)):
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    floor_s, load_s = statistics.median(times["floor"]), statistics.median(times["load"])
    print(f"{args.model}, torch {torch.__version__}, 1 thread, median of {args.rounds} interleaved rounds")
    print(f"create_model + load_state_dict(load_file): {floor_s * 1e3:8.1f} ms")
    print(f"create_model(weights=folder):              {load_s * 1e3:8.1f} ms")
    print(f"ratio: {load_s / floor_s:.2f} x")


if __name__ == "__main__":
    main()
