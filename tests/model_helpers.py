"""Helpers the model and memory-mode tests share: published parameter counts, training copies side by side."""

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

EFFICIENT_MODES = [True, "max"]

# Parameter counts of the published architectures (the DenseNet paper; torchvision's num_params for ImageNet models).
PARAMETER_COUNTS = {
    ("densenet_40_k12", 10): 1_019_722,
    ("densenet_bc_100_k12", 10): 769_162,
    ("densenet_bc_100_k12", 100): 800_032,
    ("densenet_bc_250_k24", 10): 15_324_406,
    ("densenet_bc_190_k40", 10): 25_624_430,
    ("densenet121_efficient", 1000): 7_978_856,
    ("densenet169_efficient", 1000): 14_149_480,
    ("densenet201_efficient", 1000): 20_013_928,
    ("densenet161_efficient", 1000): 28_681_000,
}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def train(model, inputs, targets, steps=3, autocast=nullcontext, seed=1):
    """Run SGD steps; return the last logits, every parameter's last gradient and every buffer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        with autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return logits.detach(), grads, buffers


def assert_close_relative(actual, expected, rtol, name):
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol}"


def assert_same_training(
    base, inputs, targets, mode, rtol=1e-5, autocast=nullcontext, device="cpu", per_tensor_gradients=False
):
    """Train copies of ``base`` naive and in ``mode``; compare logits, gradients and buffers.

    ``base``: a model, or a function that builds one (for models that cannot be deep-copied).
    Gradients are compared as one vector (relative norm of the difference) unless ``per_tensor_gradients``:
    in fp32 some BN weight gradients are ~1e-7, pure rounding noise, in which plain autograd itself differs
    from float64 by percents.
    """
    make = base if not isinstance(base, torch.nn.Module) else lambda: copy.deepcopy(base)
    reference = train(make().set_efficient(False).to(device), inputs, targets, autocast=autocast)
    result = train(make().set_efficient(mode).to(device), inputs, targets, autocast=autocast)
    assert_close_relative(result[0], reference[0], rtol, "logits")
    assert reference[1].keys() == result[1].keys()
    if per_tensor_gradients:
        for name in reference[1]:
            assert_close_relative(result[1][name], reference[1][name], rtol, name)
    else:
        expected = torch.cat([g.flatten().float() for g in reference[1].values()])
        actual = torch.cat([g.flatten().float() for g in result[1].values()])
        error = (actual - expected).norm() / expected.norm()
        assert error <= rtol, f"gradients: relative error {error:.3g} > {rtol}"
    for name in reference[2]:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(result[2][name], reference[2][name]), name
        else:
            assert_close_relative(result[2][name], reference[2][name], rtol, name)


# The arguments of a small MONAI DenseNet (two blocks, five dense layers), MONAI's spelling.
SMALL_MONAI = dict(in_channels=2, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)


def monai_densenet(spatial_dims=3):
    """A small random MONAI DenseNet with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(2)
    from monai.networks.nets import DenseNet

    model = DenseNet(spatial_dims=spatial_dims, **SMALL_MONAI)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def with_running_stats(model, seed=2):
    """``model`` after a no-grad training forward on shifted data, so that running stats are not 0 and 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32, dtype=next(model.parameters()).dtype) * 2 + 1)
    return model


def gradient_penalty_step(model, real, fake, weight=10.0):
    """One WGAN-GP critic step: Wasserstein loss plus the penalty on the gradient norm at interpolates."""
    torch.manual_seed(5)
    alpha = torch.rand(real.shape[0], 1, 1, 1, dtype=real.dtype)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_()
    critic = model(interpolates)[:, 0]
    (grad,) = torch.autograd.grad(critic.sum(), interpolates, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    loss = model(fake)[:, 0].mean() - model(real)[:, 0].mean() + weight * penalty
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), grads, {name: b.clone() for name, b in model.named_buffers()}


def freeze_batch_norms(model: nn.Module) -> None:
    """Batch norms in eval mode (running statistics used, not updated), gradients kept: fine-tuning."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
