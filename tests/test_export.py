"""Maintainer tools: torchvision -> safetensors conversion, publishing to the (loopback) Hub, manifest check/fill,
and the exported weights loading strictly into torchvision and timm with the same logits."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import densenet_efficient as de
from densenet_efficient.pretrained import ChecksumMismatchError
from export import convert, manifest, publish
from tests.weights_helpers import manifest_entry

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = torch.randn(2, 3, 64, 64)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGE)


@pytest.fixture(scope="module")
def torchvision_checkpoints(tmp_path_factory):
    """A randomly initialised torchvision DenseNet-121 (with non-trivial BatchNorm statistics) saved in the
    legacy key layout of torchvision's published files and in the current one."""
    torch.manual_seed(1)
    model = torchvision.models.densenet121().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
        for key, value in state.items()
        if not key.endswith("num_batches_tracked")
    }
    directory = tmp_path_factory.mktemp("torchvision")
    torch.save(legacy, directory / "legacy.pth")
    torch.save(state, directory / "new.pth")
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    return model, directory


@pytest.fixture(scope="module")
def exported(torchvision_checkpoints, tmp_path_factory):
    """The legacy checkpoint converted by ``python -m export.convert``; returns (folder, printed output)."""
    model, directory = torchvision_checkpoints
    output = tmp_path_factory.mktemp("export") / "densenet121_efficient.test"
    argv = [
        "--checkpoint",
        str(directory / "legacy.pth"),
        "--model",
        "densenet121_efficient",
        "--output",
        str(output),
        "--tag",
        "test",
        "--labels",
        "imagenet-1k",
        "--image-size",
        "64",
    ]
    return output, run_tool(convert.main, argv)


def run_tool(main, argv) -> str:
    from contextlib import redirect_stdout
    from io import StringIO

    buffer = StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def test_convert_checks_logits_and_prints_the_entry(exported):
    output, printed = exported
    difference = float(re.search(r"max abs logit difference vs torchvision: (\S+)", printed).group(1))
    assert difference < 1e-5
    entry = json.loads(printed[printed.index("{") :])
    data = (output / "model.safetensors").read_bytes()
    assert entry["hub"]["sha256"] == hashlib.sha256(data).hexdigest() and entry["hub"]["size"] == len(data)
    assert entry["model"] == "densenet121_efficient" and entry["tag"] == "test"
    assert sorted(path.name for path in output.iterdir()) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["legacy", "new"])
def test_convert_gives_the_same_bytes_for_the_same_input(torchvision_checkpoints, exported, tmp_path, layout):
    model, directory = torchvision_checkpoints
    output, _ = exported
    argv = [
        "--checkpoint",
        str(directory / f"{layout}.pth"),
        "--model",
        "densenet121_efficient",
        "--output",
        str(tmp_path),
        "--tag",
        "test",
        "--image-size",
        "64",
    ]
    run_tool(convert.main, argv)
    assert (tmp_path / "model.safetensors").read_bytes() == (output / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_exported_weights_load_strictly_into_torchvision_and_timm(torchvision_checkpoints, exported):
    from safetensors.torch import load_file

    timm = pytest.importorskip("timm")
    reference, _ = torchvision_checkpoints
    output, _ = exported
    state = load_file(output / "model.safetensors")
    ours = de.create_model("densenet121_efficient", weights=str(output))
    tv_model = torchvision.models.densenet121()
    tv_model.load_state_dict(state, strict=True)
    timm_model = timm.create_model("densenet121", pretrained=False)
    timm_model.load_state_dict(state, strict=True)
    expected = logits(reference)
    for model in (ours, tv_model, timm_model):
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_converting_your_own_checkpoint_claims_no_imagenet(tmp_path):
    """A user's torchvision DenseNet fine-tuned on 5 classes, converted by running the file from another folder:
    its tag, its number of classes, no labels, and the file it came from; no tv_in1k, ImageNet or torchvision's
    weights claimed."""
    torch.manual_seed(2)
    mine = torchvision.models.densenet121(num_classes=5).eval()
    torch.save(mine.state_dict(), tmp_path / "pets.pth")
    argv = ["--checkpoint", "pets.pth", "--model", "densenet121_efficient", "--output", "out", "--image-size", "64"]
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "export" / "convert.py"), *argv, "--tag", "pets"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},  # this checkout's package, as if installed
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    entry = json.loads(run.stdout[run.stdout.index("{") :])
    text = json.dumps(config) + json.dumps(entry) + (tmp_path / "out" / "README.md").read_text()
    assert entry["tag"] == "pets" and config["num_classes"] == 5
    assert "pets.pth" in entry["source"] and "a checkpoint in torchvision's layout" in entry["source"]
    for claim in ("tv_in1k", "imagenet-1k", "ImageNet weights", "label_names"):
        assert claim not in text, claim
    ours = de.create_model("densenet121_efficient", weights=str(tmp_path / "out"))
    torch.testing.assert_close(logits(ours), logits(mine), rtol=0, atol=1e-5)


def test_a_checkpoint_needs_a_tag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert.main(["--checkpoint", "x.pth", "--model", "densenet121_efficient", "--output", str(tmp_path / "o")])
    assert "--checkpoint needs --model and --tag" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_torchvision_name_resolves_to_its_url_and_checks_the_hash(loopback_hub, tmp_path, monkeypatch):
    assert convert.torchvision_url("densenet161") == "https://download.pytorch.org/models/densenet161-8d451a50.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    loopback_hub.url_files["/models/densenet121-a639ec97.pth"] = b"not torchvision's file"
    with pytest.raises(ChecksumMismatchError, match="does not start with a639ec97"):
        convert.main(
            ["--torchvision", "densenet121", "--endpoint", loopback_hub.endpoint, "--output", str(tmp_path / "out")]
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="must name a torchvision DenseNet"):
        convert.torchvision_url("resnet50")


@pytest.mark.slow
def test_export_publish_load_round_trip(loopback_hub, torchvision_checkpoints, exported, tmp_path):
    reference, _ = torchvision_checkpoints
    output, _ = exported
    printed = run_tool(
        publish.main,
        [
            str(output),
            "--repo-id",
            "org/densenet121_efficient.test",
            "--endpoint",
            loopback_hub.endpoint,
            "--token",
            "hf_loopback",
        ],
    )
    commit = re.search(r"commit: ([0-9a-f]{40})", printed).group(1)
    hub = json.loads(printed[printed.index("{") :])["hub"]
    assert hub["revision"] == commit
    assert hub["sha256"] == hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()
    model = de.create_model(
        "densenet121_efficient",
        weights=f"hf-hub:org/densenet121_efficient.test@{commit}",
        cache_dir=tmp_path / "cache",
        endpoint=loopback_hub.endpoint,
    )
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)


def test_manifest_fill_then_check(loopback_hub, tmp_path):
    from densenet_efficient.pretrained import save_pretrained

    save_pretrained(de.create_model("densenet_40_k12", block_config=[2, 2, 2]), tmp_path / "small")
    printed = run_tool(
        publish.main,
        [
            str(tmp_path / "small"),
            "--repo-id",
            "org/small",
            "--endpoint",
            loopback_hub.endpoint,
            "--token",
            "hf_loopback",
        ],
    )
    published = json.loads(printed[printed.index("{") :])["hub"]
    path = tmp_path / "manifest.json"
    unpinned = {**published, "revision": None, "sha256": None, "size": None}
    path.write_text(
        json.dumps(
            {"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.x": manifest_entry(unpinned, tag="x")}}
        )
    )
    options = ["--manifest", str(path), "--endpoint", loopback_hub.endpoint]

    assert "densenet_40_k12.x: verified nothing; filled sha256=" in run_tool(manifest.main, ["fill", *options])
    assert json.loads(path.read_text())["weights"]["densenet_40_k12.x"]["hub"] == published
    assert "verified sha256, size, revision" in run_tool(manifest.main, ["check", *options])

    wrong = json.loads(path.read_text())
    wrong["weights"]["densenet_40_k12.x"]["hub"].update(sha256="0" * 64, revision=None)
    path.write_text(json.dumps(wrong))
    before = path.read_bytes()
    for action in ("check", "fill"):
        assert manifest.main([action, *options]) == 1
    assert path.read_bytes() == before  # fill writes nothing when a recorded value is wrong


def test_manifest_check_reports_a_missing_repo(loopback_hub, tmp_path, capsys):
    path = tmp_path / "manifest.json"
    hub = {"repo_id": "org/none", "revision": None, "filename": "model.safetensors", "sha256": None, "size": None}
    path.write_text(
        json.dumps({"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.test": manifest_entry(hub)}})
    )
    assert manifest.main(["check", "--manifest", str(path), "--endpoint", loopback_hub.endpoint]) == 1
    assert "densenet_40_k12.test: FAILED RepositoryNotFoundError" in capsys.readouterr().out


@pytest.mark.parametrize("field", ["crop_pct", "image_size"])
def test_manifest_check_fails_on_a_result_without_its_protocol(tmp_path, capsys, field):
    path = tmp_path / "manifest.json"
    hub = {"repo_id": "org/none", "revision": None, "filename": "model.safetensors", "sha256": None, "size": None}
    entry = manifest_entry(hub)
    del entry["metrics"][0][field]
    path.write_text(json.dumps({"version": 1, "default_tags": {}, "weights": {"densenet_40_k12.test": entry}}))
    assert manifest.main(["check", "--manifest", str(path)]) == 1  # before any request: no endpoint needed
    assert (
        f"['weights']['densenet_40_k12.test']['metrics'][0]: '{field}' is a required property"
        in capsys.readouterr().err
    )


def test_publish_uploads_only_the_files_the_card_lists(loopback_hub, tmp_path):
    from densenet_efficient.pretrained import save_pretrained

    folder = tmp_path / "small"
    save_pretrained(de.create_model("densenet_40_k12", block_config=[2, 2, 2]), folder)
    (folder / "secret.txt").write_text("token")
    with pytest.raises(SystemExit, match=r"must hold exactly the files its card lists .*not listed \['secret.txt'\]"):
        publish.publish(folder, "org/small", endpoint=loopback_hub.endpoint, token="hf_loopback")
    assert loopback_hub.requests == []  # refused before any request
    (folder / "secret.txt").unlink()
    commit = publish.publish(folder, "org/small", endpoint=loopback_hub.endpoint, token="hf_loopback")
    uploaded = set(loopback_hub.repos["org/small"].commits[commit]) - {".gitattributes"}  # made by create_repo
    assert uploaded == {"README.md", "config.json", "model.safetensors"}


@pytest.mark.slow
def test_weights_table_lists_every_entry_and_is_the_one_in_the_readme():
    from densenet_efficient.pretrained import load_manifest

    result = subprocess.run(
        [sys.executable, "-m", "export.manifest", "table"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )  # also: the tools run from the root
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(load_manifest()["weights"])
    assert result.stdout in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def docs_block(heading: str) -> str:
    """The first ```python block after ``heading`` in docs/weights.md."""
    text = (REPO_ROOT / "docs" / "weights.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


@pytest.mark.slow
def test_readme_predict_example_prints_torchvisions_top5(torchvision_checkpoints, exported, tmp_path):
    """The docs example (image file -> top-5 ImageNet labels), run on a converted model: same labels, in the same
    order, as torchvision's DenseNet with the same tensors and torchvision's own preprocessing of those weights."""
    from contextlib import redirect_stdout
    from io import StringIO

    from PIL import Image
    from skimage.data import chelsea
    from torchvision.models import DenseNet121_Weights

    reference, _ = torchvision_checkpoints
    output, _ = exported
    Image.fromarray(chelsea()).save(tmp_path / "cat.jpg", quality=95)
    code = docs_block("## Preprocessing and labels")
    weights_line = 'de.create_model("densenet121_efficient.tv_in1k", pretrained=True)'
    assert weights_line in code
    code = code.replace(weights_line, f'de.create_model("densenet121_efficient", weights={str(output)!r})')
    code = code.replace('"cat.jpg"', repr(str(tmp_path / "cat.jpg")))
    (tmp_path / "predict.py").write_text(code)
    printed = StringIO()
    with redirect_stdout(printed):
        runpy.run_path(str(tmp_path / "predict.py"))
    labels = [line.rsplit(": ", 1)[0] for line in printed.getvalue().splitlines()]

    weights = DenseNet121_Weights.IMAGENET1K_V1
    with Image.open(tmp_path / "cat.jpg") as image:
        batch = weights.transforms()(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        expected = reference.eval()(batch).softmax(dim=1)[0].topk(5).indices.tolist()
    assert labels == [weights.meta["categories"][index] for index in expected]
