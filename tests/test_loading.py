"""Loading weights from local files: rebuilt models, classifier changes, incompatible and damaged files."""

from __future__ import annotations

import pytest
import torch

import densenet_efficient as de
from densenet_efficient import pretrained as W
from tests.weights_helpers import (
    SMALL,
    X,
    legacy_torchvision_state_dict,
    logits,
    randomise_batch_norm,
    small_model,
)

# ---------------------------------------------------------------------------------------------------------------
# save_pretrained and local files


@pytest.mark.parametrize("target", ["folder", "file"])
def test_local_weights_rebuild_the_model(tmp_path, target):
    model = randomise_batch_norm(small_model(num_classes=7))
    W.save_pretrained(model, tmp_path)
    reference = tmp_path if target == "folder" else tmp_path / "model.safetensors"
    loaded = de.create_model("densenet_40_k12", weights=str(reference))  # block_config and classes from config.json
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_num_classes_override_loads_all_but_the_classifier(tmp_path):
    model = randomise_batch_norm(small_model())
    W.save_pretrained(model, tmp_path)
    with pytest.warns(UserWarning, match="weights have 10 classes, the model 3: loaded everything but the classifier"):
        tuned = de.create_model("densenet_40_k12", weights=str(tmp_path / "model.safetensors"), num_classes=3)
    tuned.eval()
    assert tuned.classifier.out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(
            tuned.forward_head(tuned.forward_features(X), pre_logits=True),
            model.forward_head(model.forward_features(X), pre_logits=True),
            rtol=0,
            atol=0,
        )


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "bc.safetensors"  # a bare file: no config.json to rebuild from
    from safetensors.torch import save_file

    save_file(de.create_model("densenet_bc_100_k12", block_config=[2, 2, 2]).state_dict(), path)
    with pytest.raises(W.IncompatibleWeightsError) as error:
        de.create_model("densenet_40_k12", weights=str(path), **SMALL)
    message = str(error.value)
    assert "0 missing" in message
    assert "unexpected (features.denseblock1.denselayer1.conv2.weight" in message
    assert "features.conv0.weight (24, 3, 3, 3) vs (16, 3, 3, 3)" in message


def test_missing_keys_are_named(tmp_path):
    model = small_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("features.norm5")}
    from safetensors.torch import save_file

    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(W.IncompatibleWeightsError, match=r"4 missing \(features.norm5.weight, features.norm5.bias"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "partial.safetensors"), **SMALL)


def test_config_for_another_model_is_refused(tmp_path):
    W.save_pretrained(small_model(), tmp_path)
    with pytest.raises(W.UnknownWeightsError, match="weights for 'densenet_40_k12', not 'densenet_bc_100_k12'"):
        de.create_model("densenet_bc_100_k12", weights=str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_local_file_is_a_clear_error(tmp_path, damage):
    W.save_pretrained(small_model(), tmp_path)
    (tmp_path / "config.json").unlink()  # a bare file: the safetensors reader's own check
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(W.InvalidWeightsFileError, match="model.safetensors is not a readable weights file"):
        de.create_model("densenet_40_k12", weights=str(path))


def test_missing_local_file_says_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*nothing.safetensors.*hf-hub:org/name"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "nothing.safetensors"))


def test_legacy_pth_file_loads_with_weights_only(tmp_path):
    model = randomise_batch_norm(small_model())
    legacy = legacy_torchvision_state_dict(model)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    loaded = de.create_model("densenet_40_k12", weights=str(tmp_path / "legacy.pth"), **SMALL)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_pickled_object_is_refused(tmp_path):
    torch.save({"model": small_model()}, tmp_path / "pickled.pth")
    with pytest.raises(W.InvalidWeightsFileError, match="not a readable weights file"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "pickled.pth"), **SMALL)


# ---------------------------------------------------------------------------------------------------------------
# Values that are refused rather than cast or loaded (issue 17)


def _refused(state: dict[str, torch.Tensor], error_type: type[Exception], match: str) -> None:
    """Loading ``state`` into a fresh small model raises ``error_type``; the model keeps its own weights."""
    model = small_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(error_type, match=match):
        W.load_state_dict_into(model, state, "test.safetensors")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_or_bool_tensors_are_not_cast_into_float_weights(dtype):
    state = small_model().state_dict()
    state["features.conv0.weight"] = state["features.conv0.weight"].to(dtype)
    _refused(state, W.IncompatibleWeightsError, rf"features.conv0.weight holds {dtype} .*only floating-point tensors")


def test_a_float_count_is_not_cast_into_num_batches_tracked():
    state = small_model().state_dict()
    key = next(key for key in state if key.endswith("num_batches_tracked"))
    state[key] = state[key].float()
    _refused(state, W.IncompatibleWeightsError, rf"{key} holds torch.float32 .*only integer tensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(value):
    state = small_model().state_dict()
    state["features.denseblock2.denselayer1.norm1.weight"][3] = value
    _refused(state, W.InvalidWeightsFileError, "norm1.weight holds 1 NaN or infinite values of 40")


def test_a_negative_running_variance_is_refused():
    state = randomise_batch_norm(small_model()).state_dict()
    state["features.norm5.running_var"][0] = -0.5
    _refused(state, W.InvalidWeightsFileError, r"features.norm5.running_var holds negative variances .*-0.5")


def test_a_transposed_classifier_is_refused_not_dropped_as_another_number_of_classes(tmp_path):
    from safetensors.torch import save_file

    state = small_model().state_dict()
    state["classifier.weight"] = state["classifier.weight"].t().contiguous()  # (features, 10) for (10, features)
    features = state["classifier.weight"].shape[0]
    _refused(state, W.IncompatibleWeightsError, rf"classifier.weight \({features}, 10\).*transposed")
    save_file(state, tmp_path / "transposed.safetensors")
    with pytest.raises(W.IncompatibleWeightsError, match="transposed"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "transposed.safetensors"), **SMALL)


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_a_config_with_too_many_blocks_is_refused_before_building(tmp_path, loopback_hub, where):
    """40 one-layer blocks: a small network that needs inputs of 2**39 px; refused from its config.json."""
    import json

    W.save_pretrained(small_model(), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    config["model_args"]["block_config"] = [1] * 40
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    if where == "folder":
        reference, options = str(tmp_path / "export"), {}
    else:
        files = {path.name: path.read_bytes() for path in (tmp_path / "export").iterdir()}
        reference = f"hf-hub:org/deep@{loopback_hub.commit('org/deep', files)}"
        options = dict(cache_dir=tmp_path / "cache", endpoint=loopback_hub.endpoint)
    with pytest.raises(de.InvalidConfigError, match=r"40 dense blocks \(at most 16\)"):
        de.create_model("densenet_40_k12", weights=reference, **options)


def test_loaded_weights_train(tmp_path):
    model = randomise_batch_norm(small_model())
    W.save_pretrained(model, tmp_path)
    saved = (tmp_path / "model.safetensors").read_bytes()
    loaded = de.create_model("densenet_40_k12", weights=str(tmp_path)).train()
    weight = loaded.features.conv0.weight
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad and weight.dtype == torch.float32
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(X).sum().backward()
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight.detach(), before)
    assert (tmp_path / "model.safetensors").read_bytes() == saved


def test_values_are_checked_once_when_saved_or_when_no_seal_vouches_for_them(tmp_path):
    from safetensors.torch import save_file

    model = small_model()
    with torch.no_grad():
        model.features.norm5.running_var[0] = -1.0
    with pytest.raises(W.InvalidWeightsFileError, match="norm5.running_var holds negative variances"):
        W.save_pretrained(model, tmp_path / "saved")
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, tmp_path / "bare.safetensors")  # no config.json: no seal
    with pytest.raises(W.InvalidWeightsFileError, match="norm5.running_var holds negative variances"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "bare.safetensors"), **SMALL)
