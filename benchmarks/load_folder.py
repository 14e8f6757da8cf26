"""Loading a saved folder against the floor: ``create_model(name, weights=folder)`` vs ``create_model(name)`` plus
``load_state_dict(safetensors.torch.load_file(...))``, interleaved, one thread, median of ``--rounds`` rounds.

    PYTHONPATH=. python benchmarks/load_folder.py [--model densenet121_efficient] [--rounds 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import densenet_efficient as de

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="densenet121_efficient")
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()
torch.set_num_threads(1)
times: dict[str, list[float]] = {"floor": [], "load": []}
with tempfile.TemporaryDirectory() as folder:
    de.save_pretrained(de.create_model(args.model), folder)
    runs = {
        "floor": lambda: de.create_model(args.model).load_state_dict(load_file(Path(folder, "model.safetensors"))),
        "load": lambda: de.create_model(args.model, weights=folder),
    }
    for round_ in range(args.rounds + 1):  # the first a warm-up: imports, caches
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name] += [time.perf_counter() - started] * bool(round_)
floor, load = statistics.median(times["floor"]), statistics.median(times["load"])
print(f"{args.model}, torch {torch.__version__}, 1 thread, median of {args.rounds} interleaved rounds")
print(f"create_model + load_state_dict(load_file): {floor * 1e3:8.1f} ms")
print(f"create_model(weights=folder):              {load * 1e3:8.1f} ms")
print(f"ratio: {load / floor:.2f} x")
