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
    with pytest.raises(W.InvalidWeightsFileError, match="model.safetensors is not a valid safetensors file"):
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
    with pytest.raises(W.InvalidWeightsFileError, match="not a readable PyTorch checkpoint"):
        de.create_model("densenet_40_k12", weights=str(tmp_path / "pickled.pth"), **SMALL)
