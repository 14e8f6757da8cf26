"""export.monai, the maintainer script: converts a MONAI checkpoint, checks MONAI's logits, writes weights."""

import pytest
import torch

import densenet_efficient as de
from export import monai as convert_monai
from tests.model_helpers import monai_densenet

pytest.importorskip("monai")


def test_cli_writes_weights_that_load_by_name(tmp_path, capsys):
    monai = monai_densenet()
    checkpoint = tmp_path / "best_metric_model.pth"
    torch.save(monai.state_dict(), checkpoint)
    output = tmp_path / "out"
    assert (
        convert_monai.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--model",
                "densenet121_3d",
                "--output",
                str(output),
                "--size",
                "16",
            ]
        )
        == 0
    )
    assert "max abs logit difference vs MONAI: " in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = de.create_model("densenet121_3d", weights=str(output / "model.safetensors"))
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), monai(x), rtol=0, atol=1e-6)


def test_cli_refuses_what_it_cannot_convert(tmp_path, capsys):
    torch.save(monai_densenet().state_dict(), tmp_path / "small.pth")
    assert convert_monai.main(["--checkpoint", str(tmp_path / "small.pth"), "--output", str(tmp_path / "a")]) == 2
    assert (
        "no registered architecture has this layout (growth_rate=4, block_config=(2, 3), num_init_features=8, "
        "bn_size=2)" in capsys.readouterr().err
    )
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert convert_monai.main(["--checkpoint", str(tmp_path / "other.pth"), "--output", str(tmp_path / "b")]) == 2
    assert "not a MONAI DenseNet state dict: expected keys features.conv0.weight" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
