"""timm's own code driving the models after ``register_with_timm()``: the registered pretrained configurations,
``timm.create_model`` honouring tags, ``local-dir:``, ``hf-hub:``, ``pretrained_cfg``, ``pretrained_cfg_overlay``
and ``pretrained_model_args`` (the right file requested and loaded, tensors compared), and transformers'
``AutoImageProcessor`` on a folder written by ``save_pretrained``. Downloads go to the loopback hub."""

from __future__ import annotations

import json

import pytest
import torch

import densenet_efficient as de
from densenet_efficient.pretrained.manifest import MANIFEST_ENV
from tests.weights_helpers import X, hub_entry, manifest_entry, randomise_batch_norm, saved_files, small_model

timm = pytest.importorskip("timm")


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


@pytest.fixture(scope="module", autouse=True)
def registered():
    de.register_with_timm()


@pytest.fixture
def two_tags(loopback_hub, tmp_path, monkeypatch):
    """densenet_40_k12 with two tags on the loopback hub, "test" (the default) and "other" (other weights),
    registered with timm; timm's Hub client and this package's loader both talk to the loopback hub."""
    import huggingface_hub

    models, entries = {}, {}
    for tag in ("test", "other"):
        torch.manual_seed(len(tag))
        models[tag] = randomise_batch_norm(small_model())
        files = saved_files(models[tag], tmp_path / tag)
        commit = loopback_hub.commit(f"org/{tag}", files)
        entries[f"densenet_40_k12.{tag}"] = manifest_entry(hub_entry(commit, files, repo_id=f"org/{tag}"), tag=tag)
    manifest = {"version": 1, "default_tags": {"densenet_40_k12": "test"}, "weights": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "manifest.json"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", loopback_hub.endpoint)  # what HF_ENDPOINT sets
    template = loopback_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    de.register_with_timm("densenet_40_k12")
    yield models, tmp_path / "cache"
    monkeypatch.delenv(MANIFEST_ENV)
    de.register_with_timm("densenet_40_k12")  # back to the shipped manifest


def test_registered_pretrained_configurations():
    """Issue 16 item 6: no pretrained configs were registered, so timm's lists left the project out."""
    assert {"densenet121_efficient.ra_in1k", "densenet121_efficient.tv_in1k"} <= set(timm.list_pretrained("densenet*"))
    assert "densenet121_efficient.ra_in1k" in timm.list_models(pretrained=True)
    assert timm.get_pretrained_cfg_value("densenet121_efficient.ra_in1k", "test_input_size") == (3, 288, 288)
    assert timm.get_pretrained_cfg_value("densenet121_efficient", "hf_hub_id") == "timm/densenet121.tv_in1k"
    assert timm.get_pretrained_cfg_value("densenet_40_k12", "input_size") == (3, 32, 32)
    assert "densenet_40_k12" not in timm.list_models(pretrained=True)  # a configuration, no weights
    for name in de.list_models():
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert {"input_size", "pool_size", "crop_pct", "interpolation", "mean", "std"} <= set(cfg), name
        assert cfg["first_conv"] == "features.conv0" and cfg["classifier"] == "classifier"


@pytest.mark.parametrize("name", ["densenet_40_k12", "densenet121_efficient", "densenet121_3d"])
def test_pool_size_is_the_unpooled_feature_size(name):
    """timm's test_model_default_cfgs failed with KeyError: 'pool_size'."""
    model = timm.create_model(name, block_config=(1, 1, 1, 1), device="meta", dtype=torch.float32)
    cfg = model.default_cfg
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, *cfg["input_size"], device="meta"))
    assert features.shape[2:] == cfg["pool_size"] and model.in_chans == cfg["input_size"][0]


@pytest.mark.slow
def test_a_tag_asks_for_its_own_weights(two_tags, loopback_hub):
    """Issue 16 item 2: timm.create_model("NAME.TAG", pretrained=True) lost the tag and loaded the default."""
    models, cache = two_tags
    loaded = timm.create_model("densenet_40_k12.other", pretrained=True, cache_dir=cache)
    torch.testing.assert_close(logits(loaded), logits(models["other"]), rtol=0, atol=0)
    assert loopback_hub.requests_for("org/other/") and not loopback_hub.requests_for("org/test/")
    assert loaded.pretrained_cfg["tag"] == "other" and loaded.pretrained_cfg["hf_hub_id"] == "org/other"
    same = timm.create_model("densenet_40_k12", pretrained=True, pretrained_cfg="other", cache_dir=cache)
    torch.testing.assert_close(logits(same), logits(models["other"]), rtol=0, atol=0)
    default = timm.create_model("densenet_40_k12", pretrained=True, cache_dir=cache)
    torch.testing.assert_close(logits(default), logits(models["test"]), rtol=0, atol=0)


def test_local_dir_loads_the_folder(two_tags, loopback_hub, tmp_path):
    """Issue 16 item 2: "local-dir:" raised TypeError (pretrained_model_args); dropped, the folder was ignored."""
    model = randomise_batch_norm(small_model(block_config=[2, 1, 2]))
    de.save_pretrained(model, tmp_path / "mine")
    before = len(loopback_hub.requests)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'mine'}", pretrained=True)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert len(loopback_hub.requests) == before  # nothing fetched
    assert loaded.pretrained_model_args["block_config"] == [2, 1, 2]
    assert loaded.pretrained_cfg["source"] == "local-dir" and loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.data.resolve_data_config({}, model=loaded)["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    fresh = timm.create_model(f"local-dir:{tmp_path / 'mine'}", num_classes=3)  # its architecture, no weights
    assert fresh.config["block_config"] == (2, 1, 2) and fresh.num_classes == 3


def test_local_dir_config_is_checked_before_building(tmp_path):
    de.save_pretrained(small_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_args"]["block_config"] = [1] * 40  # used to hang the constructor
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(de.InvalidConfigError, match="block_config.*40 dense blocks"):
        timm.create_model(f"local-dir:{tmp_path}")


@pytest.mark.slow
def test_hf_hub_loads_the_repo(two_tags, loopback_hub, tmp_path):
    models, cache = two_tags
    model = randomise_batch_norm(small_model(num_classes=4))
    loopback_hub.commit("org/mine", saved_files(model, tmp_path / "mine"))
    loaded = timm.create_model("hf-hub:org/mine", pretrained=True, cache_dir=cache)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.num_classes == 4 and loaded.pretrained_cfg["hf_hub_id"] == "org/mine"
    assert loopback_hub.requests_for("org/mine/resolve/") and not loopback_hub.requests_for("org/test/")


@pytest.mark.slow
def test_pretrained_cfg_overlay_names_the_file(two_tags, tmp_path):
    models, cache = two_tags
    model = randomise_batch_norm(small_model())
    de.save_pretrained(model, tmp_path / "mine")
    file = tmp_path / "mine" / "model.safetensors"
    loaded = timm.create_model(
        "densenet_40_k12", pretrained=True, pretrained_cfg_overlay={"file": str(file), "crop_pct": 0.5}
    )
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert loaded.pretrained_cfg["file"] == str(file) and loaded.pretrained_cfg["crop_pct"] == 0.5
    as_dict = timm.create_model("densenet_40_k12", pretrained=True, pretrained_cfg={"file": str(file)})
    torch.testing.assert_close(logits(as_dict), logits(model), rtol=0, atol=0)


@pytest.mark.slow
def test_state_dict_overlay_goes_through_timms_loader(two_tags):
    models, _ = two_tags
    state_dict = models["other"].state_dict()
    loaded = timm.create_model(
        "densenet_40_k12", pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, block_config=(2, 2, 2)
    )
    torch.testing.assert_close(logits(loaded), logits(models["other"]), rtol=0, atol=0)
    assert "state_dict" not in loaded.pretrained_cfg


@pytest.mark.slow
def test_transformers_image_processor_reads_a_saved_folder(tmp_path):
    """Issue 16 item 6: AutoImageProcessor.from_pretrained(folder) failed on "pretrained_cfg": {}."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    model = small_model()
    de.save_pretrained(model, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).to(torch.uint8).numpy())
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[0], de.transforms(model)(image), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_timms_save_for_hf_of_a_registered_model_loads_both_ways(tmp_path):
    """timm's export of this package's model: no format marker, this package's architecture and arguments."""
    from timm.models import _hub

    model = randomise_batch_norm(timm.create_model("densenet_40_k12", block_config=(2, 2, 2), efficient="max"))
    _hub.save_for_hf(model.eval(), tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "format" not in config and config["model_args"]["efficient"] == "max"
    loaded = de.create_model("densenet_40_k12", weights=str(tmp_path))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert again.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize(
    "spelling, expected",
    [
        (dict(model_name="densenet121_efficient.ra_in1k"), ("densenet121_efficient", "ra_in1k")),
        (dict(model_name="densenet121_efficient"), ("densenet121_efficient", "tv_in1k")),
        (dict(model_name="densenet169_efficient", pretrained_cfg="tv_in1k"), ("densenet169_efficient", "tv_in1k")),
    ],
)
def test_the_shipped_tags_ask_this_packages_loader_for_their_weights(monkeypatch, spelling, expected):
    """The weights reference timm.create_model hands to this package's loader (stopped before any download)."""
    from densenet_efficient import models

    asked = []

    def resolver(name, weights, **options):
        asked.append((name, weights))
        raise LookupError("stop before downloading")

    monkeypatch.setattr(models, "resolve_weights", resolver)
    with pytest.raises(LookupError, match="stop before downloading"):
        timm.create_model(**spelling, pretrained=True)
    assert asked == [expected]
