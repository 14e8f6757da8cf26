"""Tracing, scripting and export of every model in every memory mode: torch.fx (and torchvision's
create_feature_extractor), torch.jit.script, torch.export with a dynamic batch, ONNX checked in onnxruntime,
and what training-mode tracing keeps or refuses."""

from __future__ import annotations

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.tools.memory import saved_tensor_bytes

SMALL = dict(block_config=(2, 2, 2), growth_rate=4, num_init_features=8)
CASES = [
    (name, mode)
    for name in ("densenet_bc_100_k12", "densenet_40_k12", "densenet121_efficient")
    for mode in de.MEMORY_MODES
]


def small(name: str, mode, **kwargs):
    return de.create_model(name, efficient=mode, **{**SMALL, **kwargs}).eval()


def image(model, batch: int = 2):
    size = 32 if model.config["stem"] == "cifar" else 64
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_fx_symbolic_trace_and_torchscript(name, mode):
    model = small(name, mode)
    x = image(model)
    expected = model(x)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), expected)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        traced(torch.randn(2, 1, 32, 32))  # the input check survives tracing


def test_scripting_works_after_timms_methods_were_scripted_or_called():
    """TorchScript skips prune_intermediate_layers and forward_intermediates (torch.jit.unused, as timm does): a
    failed compile of them once broke every later torch.jit.script of a DenseNet in the same process."""
    model = small("densenet121_efficient", True)
    torch.jit.script(model.prune_intermediate_layers)
    torch.jit.script(model.forward_intermediates)
    model.prune_intermediate_layers(2)
    torch.jit.script(model)
    fresh = small("densenet121_efficient", True)
    x = image(fresh)
    torch.testing.assert_close(torch.jit.script(fresh)(x), fresh(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_real_imagenet_architecture_traces_and_scripts():
    model = de.densenet121_efficient().eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)
    torch.testing.assert_close(torch.jit.script(model)(x), expected, rtol=1e-5, atol=1e-5)
    assert expected.shape == (1, 1000)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), CASES)
def test_torch_export_dynamic_batch(name, mode):
    model = small(name, mode)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (image(model),), dynamic_shapes=({0: batch},))
    x = image(model, batch=5)
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "densenet121_efficient"])
def test_onnx_matches_eager_in_onnxruntime(name, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = small(name, True)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (image(model),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = image(model, batch=3)
    (logits,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_create_feature_extractor_like_torchvisions_checks():
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    model = small("densenet121_efficient", True, block_config=(2, 2, 2, 2)).train()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes
    assert {"features.denseblock1.denselayer2", "features.transition1", "features.relu5"} <= set(train_nodes)
    nodes = {"features.relu0": "stem", "features.transition2": "t2", "features.relu5": "final"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(2, 3, 64, 64)
    out = extractor(x)
    sum(o.mean() for o in out.values()).backward()
    scripted = torch.jit.script(extractor.eval())
    model.eval()
    reference = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    torch.testing.assert_close(scripted(x)["stem"], reference[0])
    torch.testing.assert_close(extractor(x)["final"], reference[1])


@pytest.mark.slow
def test_fx_feature_extraction_of_a_training_model_keeps_the_savings():
    from torchvision.models.feature_extraction import create_feature_extractor

    saved = {}
    for mode in de.MEMORY_MODES:
        torch.manual_seed(0)
        model = de.create_model("densenet_bc_100_k12", efficient=mode, block_config=(4, 4, 4)).train()
        extractor = create_feature_extractor(model, return_nodes=["features.transition1", "features.relu5"])
        with saved_tensor_bytes(exclude=tuple(extractor.parameters())) as counter:
            out = extractor(torch.randn(4, 3, 32, 32))
        sum(o.mean() for o in out.values()).backward()
        saved[mode] = counter.bytes
    assert saved["max"] < saved[True] < 0.6 * saved[False]


def test_fx_tracing_a_layer_alone_says_what_to_trace():
    layer = small("densenet_40_k12", True).features.denseblock1.denselayer1
    with pytest.raises(TypeError, match="DenseLayer is a leaf of torch.fx graphs: trace a model that contains it"):
        torch.fx.symbolic_trace(layer)


def test_jit_trace_of_a_training_efficient_model_says_what_to_use():
    model = small("densenet_40_k12", True).train()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot record .* trace it in eval mode"):
        torch.jit.trace(model, x)
    traced = torch.jit.trace(model.set_efficient(False), x, check_trace=False)
    assert traced(x).shape == (2, 10)
    model.eval()
    torch.testing.assert_close(torch.jit.trace(model, x)(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mode", de.MEMORY_MODES)
@pytest.mark.parametrize(("spatial_dims", "stem", "side"), [(2, "imagenet", 64), (1, "cifar", 16), (3, "imagenet", 16)])
def test_every_feature_info_name_gives_its_level_through_fx(spatial_dims, stem, side, mode, training):
    """The nodes feature_info names are the levels forward_intermediates returns (a block: its concatenation)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = de.DenseNet(**SMALL, num_classes=3, in_chans=2, stem=stem, spatial_dims=spatial_dims, efficient=mode).train(
        training
    )
    names = [level["module"] for level in model.feature_info]
    extractor = create_feature_extractor(model, return_nodes=names)
    x = torch.randn((2, 2) + (side,) * spatial_dims)
    out = extractor(x)
    expected = model.forward_intermediates(x, intermediates_only=True)
    assert list(out) == names
    for level, level_out, reference in zip(model.feature_info, out.values(), expected, strict=True):
        assert level_out.shape[1] == level["num_chs"], level["module"]
        assert [side // s for s in level_out.shape[2:]] == [level["reduction"]] * spatial_dims, level["module"]
        torch.testing.assert_close(level_out, reference, msg=level["module"])


def test_block_nodes_mean_what_torchvisions_mean():
    """create_feature_extractor on a block's name: the concatenated block output, as on torchvision's DenseNet
    with the same weights."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    reference = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8).eval()
    model = de.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8).eval()
    model.load_state_dict(reference.state_dict())
    nodes = ["features.denseblock1", "features.denseblock2", "features.denseblock3", "features.transition1"]
    x = torch.randn(2, 3, 64, 64)
    ours, theirs = (create_feature_extractor(m, return_nodes=nodes)(x) for m in (model, reference))
    assert {name: o.shape[1] for name, o in ours.items()} == dict(zip(nodes, [16, 16, 16, 8], strict=True))
    for name in nodes:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "max"])
def test_fx_extractor_of_every_level_keeps_the_savings(mode):
    """Returning the blocks' concatenations from a traced training model stores none of them for backward."""
    from torchvision.models.feature_extraction import create_feature_extractor

    saved = {}
    for efficient in (False, mode):
        torch.manual_seed(0)
        model = de.create_model("densenet_bc_100_k12", efficient=efficient, block_config=(4, 4, 4)).train()
        extractor = create_feature_extractor(model, return_nodes=[level["module"] for level in model.feature_info])
        with saved_tensor_bytes(exclude=tuple(extractor.parameters())) as counter:
            out = extractor(torch.randn(4, 3, 32, 32))
        sum(o.mean() for o in out.values()).backward()
        saved[efficient] = counter.bytes
        plain = de.create_model("densenet_bc_100_k12", efficient=efficient, block_config=(4, 4, 4)).train()
        with saved_tensor_bytes(exclude=tuple(plain.parameters())) as untraced:
            plain(torch.randn(4, 3, 32, 32))
        if efficient:
            # The traced model stores no more than the model itself, but for norm5 and relu5, separate nodes
            # there (each can be returned) that run as plain modules: at most the last block's concatenation and
            # the ReLU output more.
            last = out["features.relu5"]
            extra = counter.bytes - untraced.bytes
            assert 0 < extra <= 2 * last.numel() * last.element_size()
    assert saved[mode] < 0.6 * saved[False]
