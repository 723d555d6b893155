"""Explain a corpus: data-parallel over the processes of a launcher, resumable, crash-safe.

One job is a list of items (a prompt and its index, e.g. its line number) and one function
that turns a batch of items into one JSON record each.  :func:`run` gives each process its
share, writes each finished batch at once, skips what an earlier run of the same job already
wrote, and leaves one JSON-lines file in input order::

    torchrun --nproc-per-node 2 -m lxt.cli explain --file prompts.txt --jsonl out.jsonl

Processes
    Under ``torchrun`` (or ``accelerate launch``, which wraps it; one machine or several)
    :func:`process_group` initialises ``torch.distributed`` from the launcher's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...): gloo on CPU, nccl on CUDA.  Without a
    launcher (``WORLD_SIZE`` unset or 1) the same code runs in one process, with no group.
Files
    Rank ``r`` appends its records to ``OUT.parts/rank{r}.jsonl``: one ``os.write`` of whole
    lines per batch, then ``fsync``, so a killed process leaves at most one torn last line,
    which the next run drops.  When every rank is done, rank 0 merges the final file and the
    parts in input order into a temporary file, ``fsync``, ``os.replace`` onto ``OUT`` and
    removes the parts.
Resume
    Every record carries ``index`` and ``key`` (:func:`record_key`: a hash of the prompt and
    the job's options, both stored in the record).  A rerun reads ``OUT`` and the parts, skips
    the indices already done with the same key, and shares the rest among its ranks (their
    number may differ from the first run's).  A record of another job (same index, other
    prompt or options; or an index the job does not have), or one whose key does not match
    its own prompt and options (edited by hand), is never mixed in: :func:`run` raises
    :class:`JobMismatch`, naming the line, and nothing is written.  A torn last line of ``OUT``
    (a write cut short) is dropped like a part file's, and said so; its item is computed
    again.  Two runs must not write the same ``OUT`` at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

class JobMismatch(ValueError):
    """The output file holds records of another job (or cannot be read as one of ours), or the
    ranks do not run the same job."""


def record_key(prompt: str, options: dict) -> str:
    """The identity of one result: sha256 (16 hex digits) of the prompt and the job's
    ``options`` (model identity, method, target, ...; JSON, keys sorted)."""
    blob = json.dumps([prompt, options], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------- processes
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: from ``torch.distributed`` when a group is
    initialised, else ``(0, 1)``."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``torch.distributed`` initialised from the launcher's environment when it started more
    than one process (gloo on CPU, nccl with CUDA: each rank then uses the device
    ``LOCAL_RANK``), destroyed on exit; yields ``(rank, world size)``.  One process: no group."""
    import torch
    import torch.distributed as dist

    if launched_world_size() == 1 or dist.is_initialized():
        yield rank_and_world()
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def _gather(obj) -> list:
    dist = _dist()
    if not dist:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------- files
def parts_dir(path: Path) -> Path:
    """The folder of the per-rank part files of ``path`` (``out.jsonl.parts``)."""
    return path.with_name(path.name + ".parts")


class _Entry(NamedTuple):
    """Where one record lies (records are not held in memory: a corpus can be large)."""

    key: str
    error: Optional[str]
    source: Path
    offset: int
    length: int


def _scan(path: Path, torn_ok: bool,
          dropped: Optional[Callable[[str], None]] = None) -> Iterator[tuple[dict, str, _Entry]]:
    """``(record, where, entry)`` for each line of a JSON-lines file.  A last line without its
    newline is a write cut short (a kill, a full disk): skipped in a part file (``torn_ok``);
    in the final file skipped too when it is not JSON, and named to ``dropped``.  Any other
    line that is not one of our records raises :class:`JobMismatch`."""
    with open(path, "rb") as f:
        offset = 0
        for n, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n") and torn_ok:
                return
            if not line.strip():
                continue
            where = f"{path} line {n}"
            if not line.endswith(b"\n") and not _is_json(line):
                if dropped is not None:
                    dropped(f"{where} is incomplete (a write cut short: a killed process or a full "
                            f"disk); dropped its {len(line)} bytes, that prompt is explained again")
                return
            try:
                rec = json.loads(line)
            except ValueError as err:
                raise JobMismatch(f"lxt: {where} is not a JSON record ({err}); it is not the output "
                                  "of this job: give another output file, or remove it") from err
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or "key" not in rec:
                raise JobMismatch(f"lxt: {where} is not a record of a resumable job (no index and "
                                  "key): give another output file, or remove it")
            if not line.endswith(b"\n"):
                line += b"\n"  # a final file whose last line lacks its newline (edited by hand)
            yield rec, where, _Entry(rec["key"], rec.get("error"), path, start, len(line))


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _existing(path: Path, check: Callable[[dict, str], None],
              dropped: Optional[Callable[[str], None]] = None) -> dict:
    """Index -> :class:`_Entry` of the records already written for ``path`` (its final file,
    then every part file; the first of duplicates), each passed to ``check`` first; a torn
    last line of the final file is named to ``dropped`` (see :func:`_scan`)."""
    sources = [(path, False)] if path.is_file() else []
    parts = parts_dir(path)
    if parts.is_dir():
        sources += [(part, True) for part in sorted(parts.glob("rank*.jsonl"))]
    done: dict = {}
    for source, torn_ok in sources:
        for rec, where, entry in _scan(source, torn_ok, dropped):
            check(rec, where)
            done.setdefault(rec["index"], entry)
    return done


def _mismatch(where: str, rec: dict, index: int, prompt: Optional[str], options: dict) -> str:
    if prompt is None:
        return f"{where} is a result for index {index}, which this job does not have"
    if rec.get("prompt") != prompt:
        return (f"{where} is a result for index {index} with another prompt "
                f"({_short(rec.get('prompt'))}, now {_short(prompt)})")
    old = rec.get("options") or {}
    diff = [f"{k} {old.get(k)!r} (now {options.get(k)!r})" for k in sorted(set(old) | set(options))
            if old.get(k) != options.get(k)]
    return f"{where} was computed with other options: {', '.join(diff) or 'other key'}"


def _short(text, n: int = 30) -> str:
    if not isinstance(text, str):
        return repr(text)
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class _Part:
    """This rank's part file: whole lines appended with one write, then fsync."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self.fd).st_size
        if size:  # drop a torn last line left by a killed run
            data = os.pread(self.fd, size, 0)
            keep = data.rfind(b"\n") + 1
            if keep < size:
                os.ftruncate(self.fd, keep)

    def write(self, records: Sequence[dict]) -> None:
        blob = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in records)
        data = blob.encode("utf-8")
        while data:  # one write for a regular file; the loop only guards a short write
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _merge(path: Path, order: Sequence[int], done: dict) -> None:
    """Copy the records of ``order`` (their bytes, from wherever they lie) to ``path``
    atomically, then remove the part files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sources: dict = {}
    try:
        with open(tmp, "wb") as f:
            for i in order:
                e = done[i]
                if e.source not in sources:
                    sources[e.source] = open(e.source, "rb")
                src = sources[e.source]
                src.seek(e.offset)
                line = src.read(e.length)
                f.write(line if line.endswith(b"\n") else line + b"\n")
            f.flush()
            os.fsync(f.fileno())
    finally:
        for src in sources.values():
            src.close()
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    parts = parts_dir(path)
    if parts.is_dir():
        for part in parts.glob("rank*.jsonl"):
            part.unlink()
        with contextlib.suppress(OSError):
            parts.rmdir()


class Records:
    """The records of a finished job, in input order (rank 0's result of :func:`run`): read
    from the output file as they are iterated, not held in memory (or the list, for a job
    without a file)."""

    def __init__(self, path: Optional[Path], records: Optional[list], count: int,
                 errors: int, first_error: Optional[tuple]):
        self.path, self._records = path, records
        self.count, self.errors, self.first_error = count, errors, first_error

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict]:
        if self._records is not None:
            yield from self._records
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


# ---------------------------------------------------------------------- the job
def _progress(total: int, desc: str, world: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    if world > 1:
        desc = f"{desc} (rank 0 of {world})"
    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True)


def run(items: Sequence[tuple[int, str]], compute: Callable[[list], list], path: Optional[str],
        options: dict, *, batch_size: int = 8, progress: bool = True, desc: str = "lxt explain",
        log: Callable[[str], None] = print) -> Optional[list]:
    """Compute one record per item, sharded over the ranks, resumable.

    Parameters
    ----------
    items : sequence of (int, str)
        ``(index, prompt)``, indices unique (e.g. line numbers), in output order.  Every rank
        must see the same items and options (checked).
    compute : callable
        A batch ``[(index, prompt), ...]`` -> one JSON-ready dict per item, in order (a
        failed item: a dict with an ``"error"`` message).  It must not raise for one bad item.
    path : str or None
        The output JSON-lines file (``None``: keep the records in memory; one process only).
    options : dict
        Everything besides the prompt that determines a record (model identity, method, ...);
        hashed into each record's ``key`` and stored in its ``options``.
    batch_size : int
        Items per ``compute`` call, and per write.
    progress : bool
        A progress bar on rank 0 (its own share; with several ranks it also shows the rate of
        all ranks estimated as its own times the number of ranks).
    log : callable
        Rank 0's one-line messages (what was resumed, how many errors).

    Returns
    -------
    Records or None
        On rank 0, all records in input order (iterated from the output file); on the other
        ranks ``None``.
    """
    rank, world = rank_and_world()
    if path is None and world > 1:
        raise ValueError("lxt: several processes write their shares to a file: give the output "
                         "file (--jsonl)")
    keys = {i: record_key(p, options) for i, p in items}
    prompts = dict(items)
    if len(keys) != len(items):
        raise ValueError("lxt: the item indices of a job must be unique")
    fingerprint = hashlib.sha256(json.dumps(sorted(keys.items())).encode()).hexdigest()
    other = [r for r, f in enumerate(_gather(fingerprint)) if f != fingerprint]
    if other:
        raise JobMismatch(f"lxt: rank {other[0]} sees other prompts or options than rank {rank} "
                         "(another prompt file or model on that machine?); every rank must run "
                         "the same job")
    out = Path(path) if path is not None else None

    def check(rec, where):
        i = rec["index"]
        if record_key(rec.get("prompt"), rec.get("options")) != rec["key"]:
            raise JobMismatch(f"lxt: {where} does not match its own key (its prompt or options "
                              "were edited?), so it is not the output of this job: delete that "
                              "line to explain it again, or give another output file")
        if keys.get(i) != rec["key"]:
            raise JobMismatch(f"lxt: {_mismatch(where, rec, i, prompts.get(i), options)}; nothing "
                              "was mixed in: give another output file, or remove it to start over")

    done = _existing(out, check, log if rank == 0 else None) if out is not None else {}
    _barrier()  # every rank has read the files before any writes
    todo = [i for i, _ in items if i not in done]
    mine = todo[rank::world]
    if rank == 0 and done:
        log(f"resuming {out}: {len(items) - len(todo)} of {len(items)} done, {len(todo)} to go")
    part = _Part(parts_dir(out) / f"rank{rank}.jsonl") if out is not None else None
    kept = [] if out is None else None  # records in memory only for a job without a file
    bar = _progress(len(mine), desc, world, progress and rank == 0)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(mine), batch_size):
            batch = [(i, prompts[i]) for i in mine[start:start + batch_size]]
            records = compute(batch)
            if len(records) != len(batch):
                raise RuntimeError(f"compute gave {len(records)} records for {len(batch)} items")
            # the prompt and options the key hashes (a rerun checks each record against its key)
            records = [{"index": i, "key": keys[i], "error": None, **rec, "prompt": p,
                        "options": options} for (i, p), rec in zip(batch, records)]
            if part is not None:
                part.write(records)
            else:
                kept += records
            if bar is not None:
                bar.update(len(batch))
                if world > 1:
                    rate = bar.n / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"all ranks ~{rate * world:.1f} prompts/s", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if part is not None:
            part.close()
    _barrier()  # every rank has written its share
    if rank != 0:
        return None
    if out is None:
        errors = [(r["index"], r["error"]) for r in kept if r.get("error")]
        result = Records(None, kept, len(kept), len(errors), errors[0] if errors else None)
    else:
        done = _existing(out, check)
        missing = [i for i, _ in items if i not in done]
        if missing:
            raise RuntimeError(f"lxt: {len(missing)} results missing after every rank finished "
                               f"(index {missing[0]} first); rerun the command to compute them")
        order = [i for i, _ in items]
        _merge(out, order, done)
        errors = [(i, done[i].error) for i in order if done[i].error]
        result = Records(out, None, len(order), len(errors), errors[0] if errors else None)
    if result.errors:
        log(f"{result.errors} of {len(result)} prompts failed (records with an error field; "
            f"index {result.first_error[0]} first: {result.first_error[1]})")
    return result
