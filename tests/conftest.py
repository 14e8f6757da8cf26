import os

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
