"""Every ```python block of README.md and docs/*.md runs: each file's blocks in order, in one namespace, in a fresh
temporary folder, offline, on the CPU.

Offline means what a user has after a first online run: the GitHub repository in torch.hub's cache (GitHub itself
unreachable), and the Hugging Face cache holding, for every entry of the weights manifest, small weights of the
same model (the manifest in use pins those files' sha256; the entry's other fields are the real ones), with the
Hub client in offline mode. The loading code, checksums included, is the real one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants

import densenet_efficient as de
from densenet_efficient.pretrained.manifest import MANIFEST_ENV

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)", re.MULTILINE)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text", "json"}  # a block that does not run is shell, output or data
TINY = dict(growth_rate=4, num_init_features=8)  # each entry's weights: the model with one layer per block


def python_blocks(path: Path) -> list[str]:
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))


def fill_hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache layout, written by hand: blobs named by sha256, a snapshot of ``commit`` linking to
    them, and ``refs/main`` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))


def offline_weights(tmp_path: Path) -> Path:
    """A copy of the weights manifest whose every entry names small weights in a filled Hugging Face cache;
    returns the cache."""
    cache = tmp_path / "hf-cache"
    manifest = de.pretrained.load_manifest()
    for key, entry in manifest["weights"].items():
        if entry["hub"] is None:  # only a URL: the docs load no such weights
            continue
        blocks = len(de.registry.architecture(entry["model"])["block_config"])
        model = de.create_model(entry["model"], block_config=(1,) * blocks, **TINY)
        folder = tmp_path / "weights" / key
        de.save_pretrained(model, folder)
        files = {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}
        commit = entry["hub"].get("revision") or hashlib.sha1(key.encode()).hexdigest()
        fill_hub_cache(cache, entry["hub"]["repo_id"], commit, files)
        data = files["model.safetensors"]
        entry["model_args"] = model.config
        entry["hub"].update(revision=commit, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    path = tmp_path / "weights_manifest.json"
    path.write_text(json.dumps(manifest))
    return cache


@pytest.fixture
def offline_world(tmp_path, monkeypatch, request):
    hub_dir = tmp_path / "torch-hub"
    if "torch.hub" in request.node.callspec.params["path"].read_text(encoding="utf-8"):
        shutil.copytree(
            ROOT,
            hub_dir / "densenet-efficient_densenet_efficient_main",
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "*.egg-info", "__pycache__", ".*cache", "benchmarks", "docs"
            ),
        )
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline (tests/test_docs.py)")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(offline_weights(tmp_path)))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(MANIFEST_ENV, str(tmp_path / "weights_manifest.json"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    from PIL import Image

    Image.fromarray(torch.randint(0, 256, (64, 80, 3), dtype=torch.uint8).numpy()).save("cat.jpg")


def test_every_block_is_python_or_marked_as_not_run():
    for path in DOC_FILES:
        languages = FENCE.findall(path.read_text(encoding="utf-8"))[::2]  # opening fences
        assert set(languages) <= LANGUAGES, f"{path.name}: fences {sorted(set(languages) - LANGUAGES)}"
    assert sum(len(python_blocks(path)) for path in DOC_FILES) >= 10


@pytest.mark.filterwarnings("ignore:densenet_efficient is already imported:UserWarning")  # the hub's copy
@pytest.mark.filterwarnings("ignore:.*classes, the model.*:UserWarning")  # fine-tuning snippets
@pytest.mark.parametrize(
    "path",
    # Compiling a model takes tens of seconds: compile.md's blocks run with the slow tests.
    [pytest.param(path, marks=pytest.mark.slow) if path.name == "compile.md" else path for path in DOC_FILES],
    ids=lambda path: path.name,
)
def test_python_blocks_run(path, offline_world):
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(path):
        exec(compile(block, str(path), "exec"), namespace)


def test_built_site_has_no_raw_markup_and_shares_the_readmes_sections(tmp_path):
    """The strict build of the site, as CI runs it: docstrings' Sphinx roles (:func:`x`, ...) become links where the
    site documents the object and code otherwise; no raw role or reStructuredText double backtick is left."""
    pytest.importorskip("mkdocstrings_handlers.python")
    build = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    result = subprocess.run(build, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    for page in tmp_path.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        raw = re.findall(r":(?:func|class|mod|meth|data|attr|exc|obj):(?:`|<code>)", html)
        assert not raw and "``" not in html, (page, raw)
    api = (tmp_path / "api" / "index.html").read_text(encoding="utf-8")
    assert 'href="#densenet_efficient.core.registry.resolve_model"><code>resolve_model</code></a>' in api
    assert api.count('id="densenet_efficient.models.create_model"') == 1
    assert not (tmp_path / "hooks").exists()
    # What README and the site share has one source: README's sections, included by the site's pages.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    started = (tmp_path / "getting-started" / "index.html").read_text(encoding="utf-8")
    weights = (tmp_path / "weights" / "index.html").read_text(encoding="utf-8")
    assert "pip install densenet-efficient" in started and "--8&lt;--" not in started and "--8<--" not in started
    assert 'source="local"' in started and "cifar_densenet" in started
    for key in re.findall(r"^\| `(densenet\w+\.\w+)` \|", readme, re.MULTILINE):
        assert f"<code>{key}</code>" in weights, key
    memory = (tmp_path / "memory" / "index.html").read_text(encoding="utf-8")
    assert '<img alt="Peak memory of a training step against depth' in memory
    assert (tmp_path / "images" / "depth-bc-k12-b64-cpu.png").read_bytes()[:4] == b"\x89PNG"
