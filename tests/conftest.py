import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: tiny models spend their time in thread hand-offs, not arithmetic: one intra-op thread is
#: several times faster for them on a small shared machine; the real-weight (slow) tests get
#: every core back
TINY_THREADS = 1
ALL_THREADS = torch.get_num_threads()
torch.set_num_threads(TINY_THREADS)


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(0)
    slow = request.node.get_closest_marker("slow") is not None
    torch.set_num_threads(ALL_THREADS if slow else TINY_THREADS)
    yield
    torch.set_num_threads(TINY_THREADS)


def stab(z, eps):
    """Reference stabiliser, written independently of lxt: z + eps * sign(z), sign(0) = +1."""
    sign = torch.ones_like(z)
    sign[z < 0] = -1.0
    return z + eps * sign


@pytest.fixture(scope="module")
def reference_attention():
    """The independent reference's attention functions (tests/reference.py) registered in
    transformers' global interfaces for a module's tests (``pytestmark =
    pytest.mark.usefixtures("reference_attention")``), and taken out again afterwards."""
    from reference import reference_attention_registered

    with reference_attention_registered():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its word-level tokenizer saved as a model folder (``--model DIR``)."""
    from models import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-llm")
    tiny_llama("sdpa", torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
