"""SyncBatchNorm: processes sharing batch statistics compute what one process computes on the whole batch.

Two gloo processes on CPU hold uneven slices (2 and 3 images) of one float64 batch; their outputs, input and
parameter gradients and BatchNorm buffers must equal those of one process with plain BatchNorm on the whole batch,
in every memory mode, with one collective per batch norm in forward and one in backward (none for the
recomputation in backward).
"""

from __future__ import annotations

import copy
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import densenet_efficient as de

MODES = (False, True, "max")
SLICES = ((0, 2), (2, 5))  # uneven per-process batches: the statistics must be weighted by counts
STEPS = 2


def tiny_model(mode) -> de.DenseNet:
    """ImageNet stem (norm0), bottleneck layers, a transition and norm5: every kind of batch norm."""
    torch.manual_seed(0)
    model = de.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3, efficient=mode
    )
    with torch.no_grad():  # non-trivial affine parameters, so that weight and bias enter every gradient
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Five 3x16x16 images and the loss weights: loss = sum(logits * weights)."""
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(5, 3, 16, 16, generator=generator, dtype=torch.float64),
        torch.randn(5, 3, generator=generator, dtype=torch.float64),
    )


def run_steps(model: nn.Module, inputs: torch.Tensor, weights: torch.Tensor, phase: list[str] | None = None) -> dict:
    """Forward and backward ``STEPS`` times (gradients accumulate); the last logits, input gradient, parameter
    gradients and buffers."""
    inputs = inputs.clone().requires_grad_()
    for _ in range(STEPS):
        if phase is not None:
            phase[0] = "forward"
        logits = model(inputs)
        if phase is not None:
            phase[0] = "backward"
        (logits * weights).sum().backward()
    return {
        "logits": logits.detach(),
        "input_grad": inputs.grad,
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, result_dir: str, device: str) -> None:
    """One process: join the group (gloo on CPU, NCCL on CUDA), run every memory mode on this rank's slice,
    counting collectives; on CUDA also torch's ``nn.SyncBatchNorm`` in plain mode."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    target = torch.device(device, rank) if device == "cuda" else torch.device(device)
    phase = ["setup"]
    counts: Counter = Counter()

    def counting(name, collective):
        def wrapper(*args, **kwargs):
            counts[phase[0], name] += 1
            return collective(*args, **kwargs)

        return wrapper

    for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter"):
        setattr(dist, name, counting(name, getattr(dist, name)))
    try:
        inputs, weights = (t.to(target) for t in batch())
        low, high = SLICES[rank]
        models = {str(mode): de.convert_sync_batchnorm(tiny_model(mode)) for mode in MODES}
        if device == "cuda":
            models["torch"] = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model(False))
        results = {}
        for key, model in models.items():
            counts.clear()
            result = run_steps(model.to(target), inputs[low:high], weights[low:high], phase)
            result["counts"] = dict(counts)
            result["num_norms"] = sum(isinstance(m, de.SyncBatchNorm) for m in model.modules())
            results[key] = result
        torch.save(results, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()  # both processes done with gloo before either tears it down
    finally:
        dist.destroy_process_group()


def spawn_two_processes(result_dir: Path, device: str) -> list[dict]:
    mp.spawn(_worker, args=(2, _free_port(), str(result_dir), device), nprocs=2, join=True)
    return [torch.load(result_dir / f"rank{rank}.pt", map_location="cpu", weights_only=True) for rank in range(2)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """Each rank's results, from one spawn of two gloo processes on CPU."""
    return spawn_two_processes(tmp_path_factory.mktemp("sync-bn"), "cpu")


def assert_close(actual, expected, name):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_two_processes_compute_what_one_process_computes_on_the_whole_batch(two_processes, mode):
    inputs, weights = batch()
    reference = run_steps(tiny_model(mode), inputs, weights)  # plain BatchNorm, one process
    for rank, (low, high) in enumerate(SLICES):
        result = two_processes[rank][str(mode)]
        assert_close(result["logits"], reference["logits"][low:high], f"rank {rank} logits")
        assert_close(result["input_grad"], reference["input_grad"][low:high], f"rank {rank} input gradient")
        assert result["buffers"].keys() == reference["buffers"].keys()
        for name, buffer in reference["buffers"].items():
            assert_close(result["buffers"][name], buffer, f"rank {rank} {name}")
    assert reference["buffers"]["features.norm0.num_batches_tracked"] == STEPS
    # Parameter gradients are per process (the local loss); their sum, what data parallelism reduces, is the
    # whole batch's.
    for name, grad in reference["grads"].items():
        summed = two_processes[0][str(mode)]["grads"][name] + two_processes[1][str(mode)]["grads"][name]
        assert_close(summed, grad, f"gradient of {name}")
    assert reference["grads"]["features.norm0.weight"].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_one_collective_per_batch_norm_in_forward_and_one_in_backward(two_processes, mode):
    for rank in range(2):
        result = two_processes[rank][str(mode)]
        num_norms = result["num_norms"]
        assert num_norms == 11  # norm0, 2 blocks x 2 layers x 2, transition1, norm5
        # Statistics: one all-gather per batch norm in forward. Gradient sums: one all-reduce per batch norm in
        # backward. The recomputation of batch norm (and in "max" mode of the bottleneck) in backward: none.
        assert result["counts"] == {
            ("forward", "all_gather"): STEPS * num_norms,
            ("backward", "all_reduce"): STEPS * num_norms,
        }


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="torch's nn.SyncBatchNorm synchronises only GPU (CUDA/HPU/XPU/PrivateUse1) tensors: on CPU its forward "
    "raises 'SyncBatchNorm expected input tensor to be on GPU' and DistributedDataParallel refuses it ('SyncBatchNorm "
    "layers only work with GPU modules'); its peer here needs two CUDA devices (NCCL)",
)
def test_every_mode_matches_torch_sync_batchnorm_on_cuda(tmp_path):
    ranks = spawn_two_processes(tmp_path, "cuda")
    for rank in range(2):
        peer = ranks[rank]["torch"]
        for mode in MODES:
            result = ranks[rank][str(mode)]
            for key in ("logits", "input_grad"):
                assert_close(result[key], peer[key], f"rank {rank} mode {mode} {key}")
            for group in ("grads", "buffers"):
                for name, value in peer[group].items():
                    assert_close(result[group][name], value, f"rank {rank} mode {mode} {name}")


def test_torch_sync_batchnorm_refuses_cpu_tensors():
    """Why the CPU peer is one process with plain BatchNorm, not ``nn.SyncBatchNorm``."""
    with _single_process_group(), pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        nn.SyncBatchNorm(3).double()(torch.randn(4, 3, 2, 2, dtype=torch.float64))


class _single_process_group:
    """A gloo group of one process (this one) inside the block."""

    def __enter__(self):
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    def __exit__(self, *exc):
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("group", ["none", "one process"])
def test_without_other_processes_it_is_plain_batchnorm(mode, group):
    inputs, weights = batch()
    reference = run_steps(tiny_model(mode), inputs, weights)
    model = de.convert_sync_batchnorm(tiny_model(mode))
    if group == "none":
        result = run_steps(model, inputs, weights)
    else:
        with _single_process_group():
            result = run_steps(model, inputs, weights)
    assert torch.equal(result["logits"], reference["logits"])
    assert torch.equal(result["input_grad"], reference["input_grad"])
    for name, grad in reference["grads"].items():
        assert torch.equal(result["grads"][name], grad), name
    for name, buffer in reference["buffers"].items():
        assert torch.equal(result["buffers"][name], buffer), name


def test_distributed_data_parallel_takes_it_on_cpu():
    """DDP refuses nn.SyncBatchNorm and its subclasses on CPU modules: this class must stay outside them."""
    model = de.convert_sync_batchnorm(tiny_model(True))
    with _single_process_group():
        nn.parallel.DistributedDataParallel(model)(batch()[0]).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_convert_replaces_every_batchnorm_and_shares_its_tensors():
    model = tiny_model(True)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    state = copy.deepcopy(model.state_dict())
    group = object()
    converted = de.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    converted_norms = {name: m for name, m in converted.named_modules() if isinstance(m, de.SyncBatchNorm)}
    assert converted_norms.keys() == norms.keys()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    for name, norm in converted_norms.items():
        assert norm.process_group is group
        assert norm.weight is norms[name].weight and norm.running_var is norms[name].running_var
        assert (norm.num_features, norm.eps, norm.momentum) == (norms[name].num_features, 1e-5, 0.1)
    assert converted.state_dict().keys() == state.keys()
    assert all(torch.equal(converted.state_dict()[key], value) for key, value in state.items())

    bare = nn.BatchNorm3d(4, momentum=None, affine=False).eval()
    sync = de.convert_sync_batchnorm(bare)
    assert isinstance(sync, de.SyncBatchNorm) and sync is not bare
    assert (sync.momentum, sync.affine, sync.weight, sync.training) == (None, False, None, False)
    torch_sync = de.convert_sync_batchnorm(nn.SyncBatchNorm(4))
    assert type(torch_sync) is de.SyncBatchNorm


def test_sync_batchnorm_rejects_inputs_without_channels_dimension():
    with pytest.raises(ValueError, match=r"expects an input of shape \(N, C, \*spatial\), got 1D input"):
        de.SyncBatchNorm(3)(torch.randn(3))


def _empty_rank_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    """Rank 0 holds no image, rank 1 all three: one SyncBatchNorm, forward and backward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        inputs, weights = (t[:, :3] for t in batch())
        low, high = ((0, 0), (0, 5))[rank]
        norm = de.convert_sync_batchnorm(nn.BatchNorm2d(3).double())
        x = inputs[low:high].clone().requires_grad_()
        (norm(x) * weights[low:high, :, None, None]).sum().backward()
        torch.save(
            {"input_grad": x.grad, "weight_grad": norm.weight.grad, "buffers": dict(norm.named_buffers())},
            Path(result_dir) / f"rank{rank}.pt",
        )
        dist.barrier()  # both processes done with gloo before either tears it down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_process_with_an_empty_batch_takes_part_without_changing_the_statistics(tmp_path):
    mp.spawn(_empty_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    empty, full = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2))
    inputs, weights = (t[:, :3] for t in batch())
    reference = nn.BatchNorm2d(3).double()
    x = inputs.clone().requires_grad_()
    (reference(x) * weights[:, :, None, None]).sum().backward()
    assert empty["input_grad"].shape == (0, 3, 16, 16)
    assert_close(full["input_grad"], x.grad, "input gradient")
    assert torch.equal(empty["weight_grad"], torch.zeros(3, dtype=torch.float64))
    assert_close(full["weight_grad"], reference.weight.grad, "weight gradient")
    for rank in (empty, full):
        for name, buffer in reference.named_buffers():
            assert_close(rank["buffers"][name], buffer, name)


def _one_value_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    """Rank 0 holds no image, rank 1 one image of one pixel: one value per channel across the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        norm = de.convert_sync_batchnorm(nn.BatchNorm2d(3))
        try:
            norm(torch.randn(rank, 3, 1, 1, requires_grad=True)).sum().backward()
            error = ""
        except ValueError as exc:
            error = str(exc)
        torch.save({"error": error, "buffers": dict(norm.named_buffers())}, Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_value_per_channel_across_the_group_raises_on_every_process_and_keeps_the_buffers(tmp_path):
    mp.spawn(_one_value_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert "more than 1 value per channel" in result["error"]
        assert torch.equal(result["buffers"]["running_var"], torch.ones(3))
        assert torch.equal(result["buffers"]["running_mean"], torch.zeros(3))
