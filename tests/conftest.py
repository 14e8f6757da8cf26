import os
from pathlib import Path

# Read by huggingface_hub at import time: no telemetry side requests, loopback never through a proxy.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest
import torch

# Tests run small tensors: one intra-op thread costs little on a quiet machine, and keeps them fast when other jobs
# share the cores (two OpenMP threads waiting for a busy core ran a 1D DenseNet-121 forward in 10 s instead of 0.07 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def loopback_hub():
    """A Hugging Face Hub on 127.0.0.1 (see tests/loopback_hub.py); closed, with the client's sessions, after."""
    from huggingface_hub.utils import close_session

    from tests.loopback_hub import LoopbackHub

    hub = LoopbackHub()
    yield hub
    close_session()
    hub.close()


# TorchScript and inspect read a function's source from disk when they need it: a source file edited during the run
# (a merge, a formatter) makes them read the wrong lines ("Unknown type constructor", "Can't redefine method").
def _source_mtimes() -> dict[Path, int]:
    package = Path(__file__).resolve().parents[1] / "densenet_efficient"
    return {path: path.stat().st_mtime_ns for path in package.rglob("*.py")}


_SOURCES_AT_START = _source_mtimes()


def pytest_terminal_summary(terminalreporter):
    now = _source_mtimes()
    changed = sorted(str(p) for p in _SOURCES_AT_START.keys() | now.keys() if _SOURCES_AT_START.get(p) != now.get(p))
    if changed:
        terminalreporter.write_line(f"WARNING: sources changed during the run, failures may come from it: {changed}")
