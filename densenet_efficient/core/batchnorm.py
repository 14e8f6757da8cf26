"""Training-mode batch norm and its backward on (N, C, *spatial), per process or with statistics shared by a
process group (one collective each way): the kernels of the memory-efficient layers and of ``SyncBatchNorm``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class SyncGroup:
    """The process group whose batch statistics a synchronized batch norm shares (``None``: the default group)."""

    process_group: Any


def sync_group(norm: nn.Module) -> SyncGroup | None:
    """Where ``norm``'s training statistics are shared (a norm with a ``process_group``, as ``nn.SyncBatchNorm``,
    with more than one process initialised), or ``None`` to normalise per process."""
    if not hasattr(norm, "process_group") or not dist.is_available() or not dist.is_initialized():
        return None
    group: Any = norm.process_group or dist.group.WORLD
    return SyncGroup(group) if dist.get_world_size(group) > 1 else None


def batch_norm_momentum(norm: _BatchNorm) -> float:
    """Count one training batch in ``norm`` and return its running-average factor, as nn.BatchNormNd does."""
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            return 1.0 / float(norm.num_batches_tracked)
    return 0.0 if norm.momentum is None else norm.momentum


def channel_view(x: Tensor) -> tuple[int, ...]:
    """View shape that broadcasts a per-channel vector over ``x`` (N, C, *spatial)."""
    return (1, -1) + (1,) * (x.dim() - 2)


def sync_statistics(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, sync: SyncGroup
) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of ``x`` (N, C, *spatial) over every process of ``sync``, by one all-gather
    of each process's (mean, biased variance, count): batch sizes may differ (even be zero). Updates the running
    statistics once, with the global mean and unbiased variance, as ``nn.SyncBatchNorm`` does."""
    channels, count = x.shape[1], x.numel() // x.shape[1]
    stats_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if count:
        mean, var = (t.to(stats_dtype) for t in torch.batch_norm_update_stats(x, None, None, 0.0))
    else:
        mean = var = x.new_zeros(channels, dtype=stats_dtype)
    local = torch.cat([mean, var, mean.new_full((1,), count)])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(sync.process_group))]
    dist.all_gather(gathered, local, group=sync.process_group)
    stacked = torch.stack(gathered)
    means, variances, counts = stacked[:, :channels], stacked[:, channels : 2 * channels], stacked[:, -1:]
    total = counts.sum()
    # As nn.BatchNorm2d: the variance of one value would write NaN into running_var. (Read on the host only where
    # this process holds fewer than two values: the check costs no device synchronisation otherwise.)
    if count < 2 and total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {int(total)} across the process group"
        )
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if running_mean is not None and running_var is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (total / (total - 1))).to(running_var.dtype), alpha=momentum)
    return mean, var


def batch_norm_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    sync: SyncGroup | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``x``: (output, per-channel batch mean, inverse std), running stats updated.
    With ``sync``, the statistics of every process's batch (one collective), applied by the inference kernel."""
    if sync is None:
        if x.numel() == x.shape[1]:  # as nn.BatchNorm2d: a variance of one value would write NaN into running_var
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
        return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
    mean, var = sync_statistics(x, running_mean, running_var, momentum, sync)
    output = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    return output, mean, (var + eps).rsqrt()


def batch_norm_train_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    sync: SyncGroup | None,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of training-mode batch norm for input, weight and bias (``None`` where not in ``output_mask``).
    With ``sync``, the input's includes every process's loss through the shared statistics (one all-reduce of the
    two per-channel sums and the count); weight and bias gradients stay per process (DDP averages them)."""
    if sync is None:
        return torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, eps, list(output_mask)
        )
    channels, count = x.shape[1], x.numel() // x.shape[1]
    if count:
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, eps, [output_mask[0], True, True]
        )
    else:
        grad_input, grad_weight, grad_bias = torch.zeros_like(x), mean.new_zeros(channels), mean.new_zeros(channels)
    if output_mask[0]:
        sum_dy, sum_dy_xmu = grad_bias.to(mean.dtype), grad_weight.to(mean.dtype) / invstd
        sums = torch.cat([sum_dy, sum_dy_xmu, mean.new_full((1,), count)])
        dist.all_reduce(sums, group=sync.process_group)
        if count:
            # The kernel's input gradient is (grad - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * scale
            # with the local sums and count; the same with the global ones differs by shift + x * factor.
            scale = invstd if weight is None else invstd * weight
            total = sums[-1]
            delta_dy = sum_dy / count - sums[:channels] / total
            delta_dy_xmu = sum_dy_xmu / count - sums[channels : 2 * channels] / total
            factor = invstd * invstd * delta_dy_xmu * scale
            shift = delta_dy * scale - mean * factor
            shape = channel_view(x)
            grad_input = grad_input.addcmul_(x, factor.view(shape)).add_(shift.view(shape))
    return grad_input, grad_weight if output_mask[1] else None, grad_bias if output_mask[2] else None
