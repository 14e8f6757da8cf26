"""The memory-efficient layers under torch.compile: one opaque operator per dense layer, the eager values and
BatchNorm buffers, and the eager saved-tensor contract (so the eager memory)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from densenet_efficient import create_model
from densenet_efficient.core import compiled_op
from densenet_efficient.core.functional import _BnReluConvChain, _Stage
from densenet_efficient.core.model import DenseLayer, Transition
from densenet_efficient.tools.bench import freeze_batch_norms
from densenet_efficient.tools.memory import saved_tensor_bytes

NAME = "densenet_bc_16_k12"  # two dense layers per block: layers read one and several feature maps
# The min-cut partitioner torch.compile's default backend (inductor) uses, without its code generation.
BACKEND = "aot_eager_decomp_partition"


def _batch(size=2, side=16):
    return torch.randn(size, 3, side, side), torch.randint(0, 10, (size,))


def _step(model, images, labels):
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach()


@pytest.mark.slow
def test_compiled_model_calls_one_opaque_operator_per_dense_layer_and_transition():
    graphs = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    model = create_model(NAME, efficient=True)
    images, labels = _batch()
    _step(torch.compile(model, backend=record), images, labels)
    calls = [node for graph in graphs for node in graph.graph.nodes if "bn_relu_conv_chain" in str(node.target)]
    chains = [module for module in model.modules() if isinstance(module, (DenseLayer, Transition))]
    assert len(calls) == len(chains) == 6 + 2


def _chain_arguments(kinds, keep_intermediates):
    """Operator arguments for a two-stage chain (BN-ReLU-1x1 conv, BN-ReLU-3x3 conv) on two feature maps."""
    params = [
        torch.rand(8) + 0.5,
        torch.randn(8),
        torch.randn(6, 8, 1, 1),
        torch.rand(6) + 0.5,
        torch.randn(6),
        torch.randn(4, 6, 3, 3),
    ]
    for param in params:
        param.requires_grad_(True)
    features = [torch.randn(2, 5, 6, 6, requires_grad=True), torch.randn(2, 3, 6, 6, requires_grad=True)]
    running = [torch.zeros(8), torch.ones(8), torch.zeros(6), torch.ones(6)]
    updated = [t for kind, pair in zip(kinds, (running[:2], running[2:]), strict=True) if kind == 0 for t in pair]
    frozen = [t for kind, pair in zip(kinds, (running[:2], running[2:]), strict=True) if kind == 2 for t in pair]
    geometry = [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    return (params, features, updated, frozen, kinds, [0.1, 0.1], [1e-5, 1e-5], geometry, [1, 1], keep_intermediates)


@pytest.mark.parametrize(
    "kinds, keep_intermediates", [([0, 0], True), ([2, 2], False), ([0, 2], False), ([1, 0], True)]
)
def test_operator_passes_torch_library_opcheck(kinds, keep_intermediates):
    # Schema (nothing mutated), fake (shapes-only) kernel, autograd registration, and AOT dispatch.
    arguments = _chain_arguments(kinds, keep_intermediates) + (None,)
    torch.library.opcheck(compiled_op._chain_op, arguments)


@pytest.mark.parametrize("kinds", [[0, 0], [2, 2], [0, 2]])
@pytest.mark.parametrize("keep_intermediates", [True, False])
def test_operator_computes_what_the_eager_function_computes(kinds, keep_intermediates):
    arguments = _chain_arguments(kinds, keep_intermediates)
    params, features, updated, frozen = arguments[:4]
    stages = compiled_op._stages(updated, frozen, *arguments[4:9])
    reference_stages = [
        _Stage(
            None if s.running_mean is None else s.running_mean.clone(),
            None if s.running_var is None else s.running_var.clone(),
            *(getattr(s, field) for field in ("momentum", "eps", "stride", "padding", "dilation", "groups")),
            s.batch_stats,
        )
        for s in stages
    ]
    grad_output = torch.randn(2, 4, 6, 6)
    expected = _BnReluConvChain.apply(reference_stages, keep_intermediates, *params, *features)
    expected_grads = torch.autograd.grad(expected, [*params, *features], grad_output)
    got = compiled_op.bn_relu_conv_chain(stages, keep_intermediates, params, features)
    got_grads = torch.autograd.grad(got, [*params, *features], grad_output)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=0)
    for stage, reference in zip(stages, reference_stages, strict=True):
        for name in ("running_mean", "running_var"):
            value, reference_value = getattr(stage, name), getattr(reference, name)
            if value is not None:  # updated once, in forward, as by the eager function
                torch.testing.assert_close(value, reference_value, rtol=0, atol=0)
                assert not value.requires_grad


def test_synchronized_batch_norms_fall_back_to_the_traced_function_with_a_warning(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled_op._BnReluConvChain, "apply", lambda *args: calls.append(args) or args[-1])
    stage = _Stage(None, None, 0.1, 1e-5, (1, 1), (0, 0), (1, 1), 1, True, sync=object())  # type: ignore[arg-type]
    feature = torch.randn(1, 2, 3, 3)
    with pytest.warns(UserWarning, match="synchronized batch norms.*compiler's choice"):
        compiled_op.bn_relu_conv_chain([stage], True, [], [feature])
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode, frozen", [(True, False), ("max", False), ("max", True)])
def test_compiled_model_matches_eager_outputs_gradients_and_batch_norm_buffers(mode, frozen):
    eager = create_model(NAME, efficient=mode)
    model = copy.deepcopy(eager)
    if frozen:
        freeze_batch_norms(eager)
        freeze_batch_norms(model)
    compiled = torch.compile(model, backend=BACKEND)
    for _ in range(2):  # running statistics updated once per step, in both
        images, labels = _batch()
        torch.testing.assert_close(_step(compiled, images, labels), _step(eager, images, labels))
        for got, expected in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6)
            got.grad = expected.grad = None
    for (name, got), (_, expected) in zip(model.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert not got.requires_grad


def _compiled_saved_bytes(model, images, labels):
    """Bytes the compiled forward graph hands to backward: its outputs that are neither graph inputs (parameters,
    buffers, the batch) nor the logits, partitioned by the min-cut partitioner torch.compile's default uses."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    saved = []

    def forward_compiler(graph, example_inputs):
        (outputs,) = [node.args[0] for node in graph.graph.nodes if node.op == "output"]
        for node in outputs[1:]:  # the first is the logits
            value = getattr(node, "meta", {}).get("val")
            if node.op != "placeholder" and isinstance(value, torch.Tensor):
                saved.append(value.numel() * value.element_size())
        return graph.forward

    def backend(graph, example_inputs):
        return aot_module_simplified(
            graph,
            example_inputs,
            fw_compiler=forward_compiler,
            bw_compiler=lambda graph, example_inputs: graph.forward,
            partition_fn=min_cut_rematerialization_partition,
        )

    torch._dynamo.reset()  # a fresh compilation: earlier tests' graphs and their recompilation count do not apply
    _step(torch.compile(model, backend=backend), images, labels)
    assert saved, "the forward graph was not compiled (dynamo fell back to eager)"
    return sum(saved)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "max"])
def test_compiled_efficient_model_saves_what_eager_saves(mode):
    model = create_model(NAME, efficient=mode)
    images, labels = _batch(8, 32)
    with saved_tensor_bytes((*model.parameters(), *model.buffers(), images)) as eager:
        F.cross_entropy(model(images), labels)
    compiled = _compiled_saved_bytes(model, images, labels)
    # Traced through, the function's saving was the compiler's choice: 38% more here for True, 0.70 against 0.31 x
    # naive for densenet121 at 224 px. Here the running statistics' updates (outputs too) are within the 5%.
    assert 0.9 * eager.bytes <= compiled <= 1.05 * eager.bytes, (compiled, eager.bytes)


@pytest.mark.slow
def test_double_backward_of_a_compiled_model_is_refused():
    model = torch.compile(create_model(NAME, efficient=True), backend=BACKEND)
    images, labels = _batch()
    loss = F.cross_entropy(model(images), labels)
    # torch.compile's own refusal: its compiled backward cannot build a graph of itself.
    with pytest.raises(RuntimeError, match="create_graph=False"):
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.slow
def test_exported_program_holds_standard_operators_only():
    model = create_model(NAME, efficient=True).eval()  # frozen norms, gradients on: the efficient path runs
    images = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (images,))
    assert "bn_relu_conv_chain" not in str(program.graph)
    torch.testing.assert_close(program.module()(images), model(images))


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    # torch.compile's default backend generates C++ around the opaque operator.
    eager = create_model("densenet_bc_10_k12", efficient="max")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    images, labels = _batch()
    torch.testing.assert_close(_step(compiled, images, labels), _step(eager, images, labels))
    for got, expected in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6)
    for got, expected in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
