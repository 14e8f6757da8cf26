"""The memory-efficient modes compute exactly what plain autograd computes: outputs, gradients, BN buffers."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import densenet_efficient as de
from densenet_efficient.core import functional
from tests.model_helpers import (
    EFFICIENT_MODES,
    assert_close_relative,
    assert_same_training,
    gradient_penalty_step,
    train,
    with_running_stats,
)


def CUDA(test):  # a decorator: marked cuda (benchmarks/gpu.sh runs pytest -m cuda), skipped without
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def small_networks():
    """Every layer kind: bottleneck + compression (BC), plain layers, ImageNet stem, dropout."""
    return {
        "bc": de.cifar_densenet(16, growth_rate=4),
        "plain": de.cifar_densenet(10, growth_rate=4, bottleneck=False),
        "imagenet_stem": de.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5),
        "dropout": de.cifar_densenet(16, growth_rate=4, drop_rate=0.3),
    }


@pytest.fixture
def batch():
    return torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("network", ["bc", "plain", "imagenet_stem", "dropout"])
def test_outputs_gradients_and_buffers_match_naive(network, mode, batch):
    base = small_networks()[network].set_efficient(False)
    assert_same_training(base, *batch, mode)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("network", ["bc", "plain", "imagenet_stem"])
def test_float64_every_gradient_matches_naive(network, mode, batch):
    base = small_networks()[network].set_efficient(False).double()
    inputs, targets = batch
    assert_same_training(base, inputs.double(), targets, mode, rtol=1e-9, per_tensor_gradients=True)


def test_efficient_path_is_used_when_training(batch, monkeypatch):
    calls = []
    original = functional._BnReluConvChain.apply
    monkeypatch.setattr(functional._BnReluConvChain, "apply", lambda *a: calls.append(1) or original(*a))
    model = de.cifar_densenet(16, growth_rate=4)
    model(batch[0]).sum().backward()
    # 3 blocks x 2 layers + 2 transitions + the final norm and ReLU
    assert len(calls) == 9


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_batch_norm_statistics_updated_once_per_step(mode, batch):
    """Each BN counts one batch per step and its running stats equal plain autograd's."""
    steps = 3
    model = de.cifar_densenet(16, growth_rate=4, efficient=mode)
    _, _, buffers = train(model, *batch, steps=steps)
    counts = [b.item() for name, b in buffers.items() if name.endswith("num_batches_tracked")]
    assert counts and all(count == steps for count in counts)


def test_checkpointed_torchvision_densenet_counts_batches_twice():
    """The defect this project avoids, shown on torchvision's memory_efficient=True (torch.utils.checkpoint)."""
    model = torchvision.models.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, memory_efficient=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    layer = model.features.denseblock1.denselayer1
    assert layer.norm1.num_batches_tracked.item() == 2
    assert model.features.norm0.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_autocast_bfloat16_cpu(mode, batch):
    base = de.cifar_densenet(16, growth_rate=4, efficient=False)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert_same_training(base, *batch, mode, rtol=1e-2, autocast=autocast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_reduced_precision_model_cpu(mode, dtype, batch):
    # The CPU kernel gives a bf16/fp16 model's batch statistics in its dtype, and its backward takes them so (fp32
    # raised).
    base = small_networks()["imagenet_stem"].to(dtype)
    inputs = batch[0].to(dtype)
    reference, result = (train(copy.deepcopy(base).set_efficient(m), inputs, batch[1], steps=1) for m in (False, mode))
    torch.testing.assert_close(result[0], reference[0])  # logits
    torch.testing.assert_close(result[2], reference[2])  # buffers
    # Gradients: bf16 rounding in another order, no further from the same weights' fp32 gradients than plain
    # bf16 autograd's.
    exact = train(copy.deepcopy(base).float(), inputs.float(), batch[1], steps=1)
    errors = [
        torch.cat([(r[1][k].float() - exact[1][k]).flatten() for k in exact[1]]).norm() for r in (reference, result)
    ]
    assert errors[1] <= 1.5 * errors[0], errors


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_channels_last(mode, batch):
    base = de.cifar_densenet(16, growth_rate=4, efficient=False).to(memory_format=torch.channels_last)
    inputs = batch[0].contiguous(memory_format=torch.channels_last)
    assert_same_training(base, inputs, batch[1], mode)


def test_dropout_mask_is_not_redrawn_in_backward(batch):
    """With dropout, the efficient modes draw from the RNG exactly as often as plain autograd."""
    model = de.cifar_densenet(16, growth_rate=4, drop_rate=0.5, efficient="max")
    torch.manual_seed(3)
    model(batch[0]).sum().backward()
    after_efficient = torch.rand(1)
    model.set_efficient(False)
    torch.manual_seed(3)
    model(batch[0]).sum().backward()
    assert torch.equal(torch.rand(1), after_efficient)


@pytest.mark.parametrize("mode", [False, True, "max"])
def test_no_grad_runs_plain_modules(mode, batch, monkeypatch):
    """no_grad(), and efficient=False in eval mode with gradients, never enter the recomputing function."""
    monkeypatch.setattr(functional._BnReluConvChain, "apply", lambda *a: pytest.fail("recompute path used"))
    model = de.cifar_densenet(16, growth_rate=4, efficient=mode)
    with torch.no_grad():
        model(batch[0])
        model.eval()(batch[0])
    if mode is False:
        model(batch[0]).sum().backward()


def frozen(model, every=1):
    """``model`` with every ``every``-th batch norm in eval mode (frozen), the rest training."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms[::every]:
        norm.eval()
    return model


def input_and_parameter_gradients(model, inputs):
    """Logits, the input's gradient and every parameter's gradient of one backward pass."""
    inputs = inputs.clone().requires_grad_()
    logits = model(inputs)
    (logits * torch.linspace(-1, 1, logits.shape[1], dtype=logits.dtype)).square().sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), inputs.grad, grads


@pytest.mark.parametrize("affine_grad", [True, False])
@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("network", ["bc", "plain", "imagenet_stem"])
def test_frozen_batch_norm_matches_naive(network, mode, affine_grad, batch):
    """model.eval() with gradients: outputs, input and parameter gradients equal plain autograd's, BN untouched."""
    base = with_running_stats(small_networks()[network].set_efficient(False)).eval()
    for norm in base.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.requires_grad_(affine_grad)
    buffers = {name: b.clone() for name, b in base.named_buffers()}
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        reference = input_and_parameter_gradients(copy.deepcopy(base).to(dtype), batch[0].to(dtype))
        model = copy.deepcopy(base).to(dtype).set_efficient(mode)
        result = input_and_parameter_gradients(model, batch[0].to(dtype))
        assert_close_relative(result[0], reference[0], rtol, "logits")
        assert_close_relative(result[1], reference[1], rtol, "input gradient")
        assert result[2].keys() == reference[2].keys()
        assert any(".norm" in name for name in result[2]) == affine_grad
        for name in reference[2]:
            assert_close_relative(result[2][name], reference[2][name], rtol, name)
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, buffers[name].to(buffer.dtype)), name


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_frozen_batch_norm_uses_efficient_path(mode, batch, monkeypatch):
    calls = []
    original = functional._BnReluConvChain.apply
    monkeypatch.setattr(functional._BnReluConvChain, "apply", lambda *a: calls.append(1) or original(*a))
    model = de.cifar_densenet(16, growth_rate=4, efficient=mode).eval()
    model(batch[0]).sum().backward()
    assert len(calls) == 9


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("network", ["bc", "imagenet_stem", "dropout"])
def test_mixed_training_and_frozen_norms_match_naive(network, mode, batch):
    """Every other batch norm frozen: the frozen ones keep their buffers, the others update them as plain does."""
    base = frozen(with_running_stats(small_networks()[network].set_efficient(False)), every=2)
    frozen_buffers = {
        name: b.clone() for name, b in base.named_buffers() if not base.get_submodule(name.rsplit(".", 1)[0]).training
    }
    assert frozen_buffers
    model = copy.deepcopy(base).set_efficient(mode)
    assert_same_training(base, *batch, mode, rtol=1e-5)
    train(model, *batch)
    for name, buffer in frozen_buffers.items():
        assert torch.equal(model.get_buffer(name), buffer), name


def tiny_network(mode):
    return de.DenseNet(
        growth_rate=2, block_config=(2, 1), num_init_features=2, bn_size=2, num_classes=3, stem="cifar", efficient=mode
    ).double()


def functional_logits(model):
    """``logits(x, *params)``: the model as a function of its input and parameters."""
    names = [name for name, _ in model.named_parameters()]

    def logits(x, *params):
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

    return logits


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(training):
    model = with_running_stats(tiny_network("max")).train(training)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    for mode in EFFICIENT_MODES:
        model.set_efficient(mode)
        assert torch.autograd.gradcheck(functional_logits(model), (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_gradgradcheck_float64(mode, training):
    """Double backward through the efficient function, batch norms training (batch statistics) or frozen."""
    model = with_running_stats(
        de.DenseNet(
            growth_rate=2,
            block_config=(2,),
            num_init_features=2,
            bn_size=2,
            num_classes=2,
            stem="cifar",
            efficient=mode,
        ).double()
    ).train(training)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert torch.autograd.gradgradcheck(functional_logits(model), (x, *params), eps=1e-6, atol=1e-5)
    if not training:
        for name, buffer in model.named_buffers():
            assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_matches_naive(mode, training, batch):
    base = with_running_stats(de.cifar_densenet(16, growth_rate=4, efficient=False)).train(training)
    real, fake = batch[0], torch.randn_like(batch[0])
    reference = gradient_penalty_step(copy.deepcopy(base), real, fake)
    result = gradient_penalty_step(copy.deepcopy(base).set_efficient(mode), real, fake)
    assert_close_relative(result[0], reference[0], 1e-5, "loss")
    expected = torch.cat([g.flatten() for g in reference[1].values()])
    actual = torch.cat([g.flatten() for g in result[1].values()])
    assert (actual - expected).norm() / expected.norm() <= 1e-5
    for name in reference[2]:
        assert_close_relative(result[2][name], reference[2][name], 1e-6, name)


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_torch_func_grad_matches_naive_and_counts_one_batch(mode, batch):
    """torch.func.grad of a training step (buffers passed in, as functorch requires for BN updates)."""
    base = de.cifar_densenet(16, growth_rate=4, efficient=False)

    def run(model):
        params = {name: p.detach() for name, p in model.named_parameters()}
        buffers = {name: b.clone() for name, b in model.named_buffers()}

        def loss(params, buffers, x, y):
            return F.cross_entropy(torch.func.functional_call(model, (params, buffers), (x,)), y)

        return torch.func.grad(loss)(params, buffers, *batch), buffers

    (grads, buffers), (reference, reference_buffers) = run(copy.deepcopy(base).set_efficient(mode)), run(base)
    for name in reference:
        assert_close_relative(grads[name], reference[name], 1e-6, name)
    for name in reference_buffers:
        assert torch.equal(buffers[name], reference_buffers[name]), name
    assert buffers["features.denseblock1.denselayer1.norm1.num_batches_tracked"].item() == 1


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_torch_func_vmap_per_sample_gradients_match_naive(mode, batch):
    """Per-sample gradients with vmap(grad(.)) over a batch, batch norm frozen as vmap requires."""
    base = with_running_stats(de.cifar_densenet(16, growth_rate=4, efficient=False)).eval()

    def per_sample_grads(model):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params, x, y):
            return F.cross_entropy(torch.func.functional_call(model, params, (x[None],)), y[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, *batch)

    reference = per_sample_grads(base)
    result = per_sample_grads(copy.deepcopy(base).set_efficient(mode))
    for name in reference:
        assert result[name].shape == (batch[0].shape[0], *base.get_parameter(name).shape)
        assert_close_relative(result[name], reference[name], 1e-6, name)


@pytest.mark.slow
def test_torch_compile_matches_eager(batch):
    model = de.cifar_densenet(10, growth_rate=4, efficient=True)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model)
    eager_out = model(batch[0])
    eager_out.sum().backward()
    compiled_out = compiled(batch[0])
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(model.named_buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(c, b, msg=name)


def test_torchvision_densenet121_weights_load_strictly_and_match():
    reference = torchvision.models.densenet121(weights=None).eval()
    state = reference.state_dict()
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(inputs)
    for mode in [False, True, "max"]:
        model = de.densenet121_efficient(efficient=mode)
        model.load_state_dict(state, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(inputs), expected, rtol=1e-5, atol=1e-5)
    train_model = de.densenet121_efficient(efficient=True)
    train_model.load_state_dict(state, strict=True)
    reference.train()
    torch.testing.assert_close(train_model(inputs), reference(inputs), rtol=1e-5, atol=1e-5)


@CUDA
@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_cuda_matches_naive(mode, batch):
    base = de.cifar_densenet(16, growth_rate=4, efficient=False)
    inputs, targets = (t.cuda() for t in batch)
    assert_same_training(base, inputs, targets, mode, rtol=1e-4, device="cuda")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_cuda_autocast(mode, dtype, batch):
    base = de.cifar_densenet(16, growth_rate=4, efficient=False)
    inputs, targets = (t.cuda() for t in batch)
    autocast = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    assert_same_training(base, inputs, targets, mode, rtol=2e-2, autocast=autocast, device="cuda")


@pytest.mark.parametrize("mode", EFFICIENT_MODES)
def test_jit_trace_of_eval_model_runs_plain_modules(mode, batch):
    """torch.jit.trace cannot record the autograd function: tracing runs the plain modules (eval mode, grad on)."""
    model = de.cifar_densenet(16, growth_rate=4, efficient=mode).eval()
    traced = torch.jit.trace(model, (batch[0],))
    torch.testing.assert_close(traced(batch[0]), model(batch[0]), rtol=1e-5, atol=1e-6)
