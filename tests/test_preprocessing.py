"""What travels with the weights: ``model.pretrained_cfg``, ``densenet_efficient.transforms`` (checked against
timm's ``create_transform`` on real photographs), ImageNet label names, and any number of input channels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import densenet_efficient as de
from densenet_efficient.pretrained.loading import PretrainedWeights, adapt_input_conv
from densenet_efficient.pretrained.manifest import label_names
from tests.weights_helpers import randomise_batch_norm, small_model

timm_data = pytest.importorskip("timm.data")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # shipped inside scikit-image, no download


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)())


def imagenet_model(**cfg) -> de.DenseNet:
    model = de.create_model("densenet121_efficient", block_config=[1, 1, 1, 1])
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg}
    return model


CONFIGS = {
    "timm ra_in1k": {
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "test_input_size": (3, 288, 288),
        "test_crop_pct": 0.95,
    },
    "torchvision": {"interpolation": "bilinear", "crop_pct": 0.875},
    "uncropped 160 px": {"input_size": (3, 160, 160), "interpolation": "bilinear", "crop_pct": 1.0},
    "other statistics": {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.2, 0.3), "interpolation": "nearest", "crop_pct": 0.9},
}


@pytest.mark.parametrize("use_test_size", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_eval_transforms_equal_timms_create_transform(config, use_test_size):
    model = imagenet_model(**CONFIGS[config])
    ours = de.transforms(model, use_test_size=use_test_size)
    data_config = timm_data.resolve_data_config(model=model, use_test_size=use_test_size)  # timm reads our cfg
    theirs = timm_data.create_transform(**data_config, is_training=False)
    for name in PHOTOS:
        image = photo(name)
        expected = theirs(image)
        assert expected.shape[-1] == (
            288 if use_test_size and "test_input_size" in CONFIGS[config] else model.pretrained_cfg["input_size"][-1]
        )
        torch.testing.assert_close(ours(image), expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_jpeg_written_and_decoded_with_torchvision_io(tmp_path):
    import torchvision.io

    path = tmp_path / "chelsea.jpg"
    torchvision.io.write_jpeg(
        torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).contiguous(), str(path), quality=90
    )
    model = imagenet_model(**CONFIGS["torchvision"])
    ours = de.transforms(model)
    theirs = timm_data.create_transform(**timm_data.resolve_data_config(model=model), is_training=False)
    with Image.open(path) as image:
        from_pil = ours(image.convert("RGB"))
        torch.testing.assert_close(from_pil, theirs(image.convert("RGB")), rtol=0, atol=0)
    decoded = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)))  # uint8 (3, H, W)
    from_tensor = ours(decoded)
    assert from_tensor.dtype == torch.float32 and from_tensor.shape == (3, 224, 224)
    # the same pipeline on a tensor resizes with torch's antialiased kernel instead of PIL's: close, not equal
    assert (from_tensor - from_pil).abs().mean() < 0.02


def test_training_transforms_crop_flip_and_normalise():
    model = imagenet_model(**CONFIGS["timm ra_in1k"])
    train = de.transforms(model, training=True)
    names = [type(step).__name__ for step in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToFloatTensor", "Normalize"]
    torch.manual_seed(0)
    first = train(photo("coffee"))
    torch.manual_seed(0)
    assert torch.equal(first, train(photo("coffee"))) and first.shape == (3, 224, 224)


def test_transforms_accept_a_cfg_dict_and_a_manifest_entry():
    cfg = de.get_pretrained_cfg("densenet121_efficient.ra_in1k")
    from_entry = de.transforms(cfg, use_test_size=True)
    assert from_entry(photo("rocket")).shape == (3, 288, 288)
    from_dict = de.transforms(cfg.model_cfg())
    assert from_dict(photo("rocket")).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="no input_size, mean: cannot build its preprocessing"):
        de.transforms({"std": (1.0,)})
    with pytest.raises(TypeError, match="expected a model, a pretrained_cfg dict or a PretrainedCfg, got str"):
        de.transforms("densenet121_efficient")


def test_gray_configuration_converts_to_one_channel():
    model = de.create_model("densenet121_efficient", block_config=[1, 1, 1, 1], in_chans=1)
    out = de.transforms(model)(photo("astronaut"))
    assert out.shape == (1, 224, 224)


def test_architecture_defaults_without_weights():
    cifar = small_model()
    assert cifar.pretrained_cfg["input_size"] == (3, 32, 32) and cifar.pretrained_cfg["crop_pct"] == 1.0
    assert de.transforms(cifar)(photo("chelsea")).shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Label names


def test_imagenet_weights_carry_torchvisions_category_names():
    from torchvision.models import DenseNet121_Weights

    def loaded_cfg(model: de.DenseNet) -> dict:  # the cfg the loader gives a model loading tv_in1k's weights
        weights_cfg = de.get_pretrained_cfg("densenet121_efficient.tv_in1k").model_cfg()
        return PretrainedWeights("tv_in1k", {}, model.state_dict, weights_cfg).load_into(model).pretrained_cfg

    cfg = loaded_cfg(de.create_model("densenet121_efficient", block_config=[1, 1, 1, 1]))
    assert cfg["label_names"] == tuple(DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(cfg["label_names"]) == 1000 and cfg["label_names"][281] == "tabby"
    assert cfg["license"] == "apache-2.0" and "converted from torchvision" in cfg["description"]
    tuned_cfg = loaded_cfg(de.create_model("densenet121_efficient", block_config=[1, 1, 1, 1], num_classes=5))
    assert "label_names" not in tuned_cfg and tuned_cfg["num_classes"] == 5  # other classes: not ImageNet's
    assert label_names("imagenet-1k") == cfg["label_names"]


def test_saved_label_names_travel_with_the_weights(tmp_path):
    classes = [f"class {index}" for index in range(10)]
    de.save_pretrained(small_model(), tmp_path, label_names=classes)
    assert de.create_model("densenet_40_k12", weights=str(tmp_path)).pretrained_cfg["label_names"] == tuple(classes)


# ---------------------------------------------------------------------------------------------------------------
# Any number of input channels


@pytest.mark.parametrize("in_chans", [1, 2, 4, 5, 8])
def test_adapt_input_conv_is_timms(in_chans):
    from timm.models import adapt_input_conv as timm_adapt

    weight = torch.randn(24, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv(in_chans, weight), timm_adapt(in_chans, weight), rtol=0, atol=0)


def test_gray_model_on_a_gray_image_gives_the_rgb_models_logits(tmp_path):
    rgb = randomise_batch_norm(small_model())
    de.save_pretrained(rgb, tmp_path)
    gray = de.create_model("densenet_40_k12", weights=str(tmp_path), in_chans=1).eval()
    assert gray.features.conv0.weight.shape == (16, 1, 3, 3)
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    assert gray.pretrained_cfg["input_size"] == (1, 32, 32) and len(gray.pretrained_cfg["mean"]) == 1


def test_more_channels_load_repeated_and_rescaled(tmp_path):
    rgb = small_model()
    de.save_pretrained(rgb, tmp_path)
    four = de.create_model("densenet_40_k12", weights=str(tmp_path), in_chans=4)
    expected = torch.cat([rgb.features.conv0.weight, rgb.features.conv0.weight[:, :1]], 1) * 0.75
    torch.testing.assert_close(four.features.conv0.weight, expected, rtol=0, atol=0)
