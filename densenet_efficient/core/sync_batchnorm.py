"""Synchronized batch norm on every device (gloo on CPU, NCCL on CUDA) that stays memory-efficient: inside dense
layers and transitions the memory-efficient function computes it itself (one collective per batch norm each way,
none when backward recomputes the norm; running statistics updated once)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import batch_norm_momentum, batch_norm_train, batch_norm_train_backward, sync_group


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm with statistics shared across ``sync``'s processes; stores the input, weight and
    the global per-channel mean and inverse standard deviation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, *args: Any) -> Tensor:
        """``args``: bias, running_mean, running_var, momentum, eps, sync, as :func:`.batchnorm.batch_norm_train`."""
        output, mean, invstd = batch_norm_train(x, weight, *args)
        ctx.eps, ctx.sync = args[-2:]
        ctx.save_for_backward(x, weight, mean, invstd)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        grads = batch_norm_train_backward(
            grad_output.contiguous(), x, weight, mean, invstd, ctx.eps, ctx.sync, ctx.needs_input_grad[:3]
        )
        return (*grads, None, None, None, None, None)


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, *spatial) whose training statistics are shared by ``process_group`` (default: every
    process; processes may hold different batch sizes), with ``nn.SyncBatchNorm``'s arguments, parameters and
    buffers. Without a group of several processes, or in eval mode, it is ``nn.BatchNorm2d``. Not a subclass of
    ``nn.SyncBatchNorm``: DistributedDataParallel refuses those on CPU."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of shape (N, C, *spatial), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        sync = sync_group(self) if self.training else None
        if sync is None:
            return super().forward(input)
        self._check_input_dim(input)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        momentum = batch_norm_momentum(self)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, *stats, momentum, self.eps, sync)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """``module`` with every batch norm replaced by a :class:`SyncBatchNorm` over ``process_group`` holding the same
    tensors, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does. Call it before ``DistributedDataParallel``."""
    output = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        settings = {k: getattr(module, k) for k in ("num_features", "eps", "momentum", "affine", "track_running_stats")}
        output = SyncBatchNorm(**settings, process_group=process_group, bias=module.bias is not None)
        if module.affine:
            output.weight, output.bias = module.weight, module.bias
        output.running_mean, output.running_var = module.running_mean, module.running_var
        output.num_batches_tracked, output.training = module.num_batches_tracked, module.training
        if hasattr(module, "qconfig"):
            output.qconfig = module.qconfig
    elif isinstance(module, SyncBatchNorm):
        module.process_group = process_group
    for name, child in module.named_children():
        output.add_module(name, convert_sync_batchnorm(child, process_group))
    return output
