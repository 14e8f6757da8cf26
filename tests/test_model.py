"""The DenseNet model: parameter counts, layouts, fine-tuning surface and input validation."""

import pytest
import torch

import densenet_efficient as de
from tests.model_helpers import PARAMETER_COUNTS, count_parameters


@pytest.mark.parametrize(("name", "num_classes"), PARAMETER_COUNTS)
def test_parameter_counts(name, num_classes):
    model = de.create_model(name, num_classes=num_classes)
    assert count_parameters(model) == PARAMETER_COUNTS[name, num_classes]


def test_densenet264_layout():
    model = de.densenet264_efficient()
    blocks = [len(m) for n, m in model.features.named_children() if n.startswith("denseblock")]
    assert blocks == [6, 12, 64, 48]
    assert model.num_features == 2688


def test_set_efficient_rejects_invalid_mode():
    model = de.cifar_densenet(10, growth_rate=2)
    with pytest.raises(ValueError, match="valid values are False"):
        model.set_efficient("true")
    assert model.efficient is True


def test_wrong_input_channels_and_size_fail_before_compute(monkeypatch):
    model = de.densenet121_efficient(in_chans=1, num_classes=3)
    monkeypatch.setattr(model.features, "forward", lambda x: pytest.fail("computed"))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\), got \(2, 3, 64, 64\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\), got \(1, 64, 64\)"):
        model(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"too small: this network needs every side \(H, W\) of at least 29"):
        model(torch.zeros(1, 1, 28, 28))


def test_min_input_size_is_the_smallest_that_runs():
    for model in [
        de.DenseNet(growth_rate=2, block_config=(1, 1, 1, 1), num_init_features=4, num_classes=2),
        de.cifar_densenet(10, growth_rate=2),
    ]:
        size = model.min_input_size
        assert model(torch.randn(2, 3, size, size)).shape == (2, model.config["num_classes"])
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(2, 3, size - 1, size))


def test_fine_tuning_surface():
    model = de.densenet_bc_100_k12(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 8, 8)
    assert (features >= 0).all()
    assert model.get_classifier() is model.classifier
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.config["num_classes"] == 7
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_in_chans_and_state_dict_layout():
    model = de.densenet121_efficient(in_chans=1, num_classes=4)
    keys = model.state_dict().keys()
    assert model.features.conv0.weight.shape == (64, 1, 7, 7)
    for key in [
        "features.conv0.weight",
        "features.norm0.running_var",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer6.conv2.weight",
        "features.transition3.norm.num_batches_tracked",
        "features.transition3.conv.weight",
        "features.denseblock4.denselayer16.conv1.weight",
        "features.norm5.bias",
        "classifier.weight",
    ]:
        assert key in keys


def test_core_import_is_light():
    import subprocess
    import sys

    # tqdm is left out: torch itself imports it.
    code = (
        "import sys, densenet_efficient; "
        "print(sorted(m for m in ('huggingface_hub', 'safetensors', 'matplotlib', 'torchvision', 'sklearn', "
        "'jsonschema', 'timm', 'onnx', 'monai') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _TookTooLong(Exception):
    pass


def _within(seconds: float, build):
    """``build()``, or ``_TookTooLong`` after ``seconds`` (SIGALRM: interrupts a pure-Python loop)."""
    import signal

    def interrupt(signum, frame):
        raise _TookTooLong

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return build()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("stem", "blocks", "expected"), [("cifar", 3, 4), ("imagenet", 4, 29), ("cifar", 40, 2**39)])
def test_min_input_size_is_closed_form_even_for_many_blocks(stem, blocks, expected):
    """40 one-layer blocks hung the constructor (a loop up to 2**39); the smallest input is computed now."""
    with torch.device("meta"):
        model = _within(5, lambda: de.DenseNet(block_config=(1,) * blocks, stem=stem, growth_rate=4))
    assert model.min_input_size == expected
    if expected < 64:  # the smallest input runs, one pixel less is refused
        small = de.DenseNet(block_config=(1,) * blocks, stem=stem, growth_rate=4).eval()
        assert small(torch.zeros(1, 3, expected, expected)).shape == (1, 1000)
        with pytest.raises(ValueError):
            small(torch.zeros(1, 3, expected - 1, expected - 1))
