"""densenet121_3d with MONAI's norm/act choices against MONAI's DenseNet121 with the same ones: peak live tensor
bytes of one training step (forward, cross-entropy, backward) and the median step time, on CPU.

    python benchmarks/norms_3d.py --norm instance --side 64 --batch-size 1

(``bench`` builds registered models with their default batch norm, so this script measures the other norms.)
"""

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121

from densenet_efficient.core.monai_layout import monai_densenet
from densenet_efficient.tools.memory import LiveTensorBytes


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="instance", help="MONAI's norm spelling (default: instance)")
    parser.add_argument("--act", default="relu", help="MONAI's act spelling (default: relu)")
    parser.add_argument("--side", type=int, default=64, help="volume side (default: 64)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, args.side, args.side, args.side)
    y = torch.zeros(args.batch_size, dtype=torch.long)
    layers = dict(norm=args.norm, act=args.act)
    peers = {f"efficient={mode!r}": monai_densenet(3, 1, 2, **layers, efficient=mode) for mode in (False, True, "max")}
    peers["MONAI DenseNet121 (plain autograd)"] = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, **layers)
    print(
        f"densenet121_3d, norm={args.norm!r}, act={args.act!r}, batch {args.batch_size}, {args.side}^3, fp32 on cpu, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}"
    )
    print("| model | peak live tensors (MiB) | memory x naive | step (s) | time x naive |")
    print("| --- | --- | --- | --- | --- |")
    rows = {}
    for label, model in peers.items():
        step(model, x, y)  # warm-up
        with LiveTensorBytes() as counter:
            step(model, x, y)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step(model, x, y)
            times.append(time.perf_counter() - start)
        rows[label] = counter.peak, statistics.median(times)
    naive = rows["efficient=False"]
    for label, (peak, seconds) in rows.items():
        print(f"| {label} | {peak / 2**20:.1f} | {peak / naive[0]:.3f} | {seconds:.2f} | {seconds / naive[1]:.2f} |")


if __name__ == "__main__":
    main()
