import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def stab(z, eps):
    """Reference stabiliser, written independently of lxt: z + eps * sign(z), sign(0) = +1."""
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign
