"""config.json beside weights (this project's and timm's ``save_for_hf``), local and on the Hub: validated against
the architecture and the weights file's header before anything is built."""

from __future__ import annotations

import json

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import models
from densenet_efficient.pretrained.loading import state_size
from tests.weights_helpers import logits, randomise_batch_norm, saved_files, small_model


def saved(tmp_path, **kwargs):
    model = randomise_batch_norm(small_model(**kwargs))
    de.save_pretrained(model, tmp_path)
    return model, tmp_path / "config.json"


def edit_config(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "JSON object.*list"),
        ('"densenet"', "JSON object.*str"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_config_that_is_not_a_json_object_names_the_file(tmp_path, text, message):
    _, config = saved(tmp_path)
    config.write_text(text)
    with pytest.raises(de.InvalidConfigError, match=f"{config}.* {message}"):
        de.create_model("densenet_40_k12", weights=str(tmp_path))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(model_args=None), "'model_args'.*object.*null"),
        (lambda c: c.update(surprise=1), r"unknown keys \['surprise'\]"),
        (
            lambda c: c["model_args"].update(depth=100),
            r"'depth'.*not arguments of densenet_40_k12.*valid: .*growth_rate",
        ),
        (lambda c: c["model_args"].update(growth_rate=-3), "growth_rate.*>= 1.*-3"),
        (lambda c: c["model_args"].update(growth_rate="12"), "growth_rate.*int.*str"),
        (lambda c: c["model_args"].update(stem="tiny"), "stem.*one of.*'cifar'.*'tiny'"),
        (lambda c: c["model_args"].update(block_config=[10**6]), "1000000 layers.*at most 10000"),
        (lambda c: c.update(num_classes=4), "num_classes 4.*num_classes 10.*differ"),
        (lambda c: c.update(pretrained_cfg={"mean": "0.5"}), "mean.*finite"),
        (
            lambda c: c.update(pretrained_cfg={"input_size": [3, 0, 32]}),
            r"input_size.*\[channels.*\(3, 0, 32\)",
        ),
        (lambda c: c.update(pretrained_cfg={"crop_pct": 2}), r"crop_pct.*\(0, 1\].*\b2\b"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(tmp_path, change, message):
    _, config = saved(tmp_path)
    edit_config(config, change)
    with pytest.raises(de.InvalidConfigError, match=f"{config}.*{message}"):
        de.create_model("densenet_40_k12", weights=str(tmp_path))


def test_huge_config_is_refused_before_any_allocation(tmp_path, monkeypatch):
    """A config asking for billions of parameters beside weights of 0.05e6: refused by counting, before create_model
    builds anything."""
    _, config = saved(tmp_path)
    edit_config(config, lambda c: c["model_args"].update(growth_rate=3000, num_init_features=4000))
    models.architecture("densenet_40_k12")  # the registry's defaults, cached once per process: not the model loaded

    def no_build(*args, **kwargs):
        raise AssertionError("create_model built the model before the config was checked")

    monkeypatch.setattr(models, "DenseNet", no_build)
    with pytest.raises(de.InvalidConfigError) as error:
        de.create_model("densenet_40_k12", weights=str(tmp_path))
    parameters = int(str(error.value).split(" with ")[1].split(" parameters")[0].replace(",", ""))
    assert parameters > 1.6e9
    assert "whose tensors are not the weights'" in str(error.value)


@pytest.mark.parametrize(
    "name, args",
    [
        ("densenet_40_k12", {}),
        ("densenet_bc_100_k12", {"num_classes": 0}),
        ("densenet121_efficient", {"in_chans": 1, "compression": 0.3}),
        ("densenet121_3d", {}),
        ("densenet121_efficient", {"spatial_dims": 1, "bn_size": 2, "block_config": (1, 3)}),
    ],
)
def test_state_size_counts_what_the_model_holds(name, args):
    """The closed form that refuses a config before building is exactly what the built model holds."""
    model = de.create_model(name, **args)
    state = model.state_dict()
    values = sum(value.numel() for key, value in state.items() if not key.endswith("num_batches_tracked"))
    assert state_size(model.config) == (sum(p.numel() for p in model.parameters()), values)


def test_config_that_does_not_match_its_weights_is_refused(tmp_path):
    _, config = saved(tmp_path)
    edit_config(config, lambda c: c["model_args"].update(block_config=[3, 2, 2]))
    with pytest.raises(de.InvalidConfigError, match=r"config.json.*densenet_40_k12.*not the weights'"):
        de.create_model("densenet_40_k12", weights=str(tmp_path))


def test_invalid_config_on_the_hub_names_the_repo(loopback_hub, tmp_path):
    files = saved_files(small_model(), tmp_path / "export")
    commit = loopback_hub.commit("org/bad", {**files, "config.json": b'{"model_args": null}'})
    with pytest.raises(
        de.InvalidConfigError,
        match=r"hf-hub:org/bad@\w+.*config.json.*'model_args'.*object",
    ):
        de.create_model(
            "densenet_40_k12",
            weights=f"hf-hub:org/bad@{commit}",
            cache_dir=tmp_path / "cache",
            endpoint=loopback_hub.endpoint,
        )


# ---------------------------------------------------------------------------------------------------------------
# timm's save_for_hf


@pytest.fixture(scope="module")
def timm_small(tmp_path_factory):
    """A small timm DenseNet-121 (2 layers per block, 10 classes) with non-trivial BatchNorm statistics, saved by
    timm's own save_for_hf as safetensors."""
    timm = pytest.importorskip("timm")
    from timm.models import _hub

    torch.manual_seed(3)
    model = timm.create_model("densenet121", block_config=(2, 2, 2, 2), num_classes=10).eval()
    randomise_batch_norm(model)
    folder = tmp_path_factory.mktemp("timm") / "densenet121_small"
    _hub.save_for_hf(model, folder, model_args={"block_config": (2, 2, 2, 2)}, safe_serialization=True)
    return model, folder


def test_timm_save_for_hf_folder_loads_with_timms_logits(timm_small):
    model, folder = timm_small
    config = json.loads((folder / "config.json").read_text())
    assert config["global_pool"] == "avg" and config["model_args"]["global_pool"] == "avg"  # ignored: default
    loaded = de.create_model("densenet121_efficient", weights=str(folder))
    assert loaded.config["block_config"] == (2, 2, 2, 2) and loaded.config["num_classes"] == 10
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(image), model(image), rtol=1e-5, atol=1e-5)
    assert loaded.pretrained_cfg["interpolation"] == "bicubic"
    assert loaded.pretrained_cfg["test_input_size"] == (3, 288, 288)


def test_timm_repo_on_the_hub_loads(timm_small, loopback_hub, tmp_path):
    model, folder = timm_small
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    commit = loopback_hub.commit("timm/densenet121.small", files)
    loaded = de.create_model(
        "densenet121_efficient",
        weights=f"hf-hub:timm/densenet121.small@{commit}",
        cache_dir=tmp_path / "cache",
        endpoint=loopback_hub.endpoint,
    )
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(image), model(image), rtol=1e-5, atol=1e-5)
    assert loaded.pretrained_cfg["hf_hub_id"] == f"timm/densenet121.small@{commit}"
    assert loaded.pretrained_cfg["source"] == "hf-hub"


@pytest.mark.parametrize(
    "key, value, why",
    [("global_pool", "max", "not supported"), ("stem_type", "deep", "not supported")]
    + [
        ("act_layer", "gelu", "not supported"),
        ("aa_layer", "blurpool", "not supported"),
        ("zoom", 2, "no counterpart"),
    ],
)
def test_timm_argument_off_its_default_is_refused(timm_small, tmp_path, key, value, why):
    _, folder = timm_small
    for path in folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    edit_config(tmp_path / "config.json", lambda c: c["model_args"].update({key: value}))
    with pytest.raises(de.InvalidConfigError, match=f"{key}={value!r} .*{why}.*densenet121_efficient"):
        de.create_model("densenet121_efficient", weights=str(tmp_path))


def test_timm_config_for_another_depth_points_at_the_right_model(timm_small):
    _, folder = timm_small
    with pytest.raises(
        de.UnknownWeightsError,
        match=r"timm's 'densenet121'.*'densenet169_efficient'.*create_model\('densenet121_efficient'",
    ):
        de.create_model("densenet169_efficient", weights=str(folder))


def test_weights_of_a_torch_bin_folder_load(timm_small, tmp_path):
    """timm's default (safe_serialization=False) writes pytorch_model.bin; it is read with weights_only=True."""
    model, _ = timm_small
    from timm.models import _hub

    _hub.save_for_hf(model, tmp_path, model_args={"block_config": (2, 2, 2, 2)})
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = de.create_model("densenet121_efficient", weights=str(tmp_path))
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=1e-5, atol=1e-5)
