"""Throughput of ``lxt explain --file --jsonl`` with 1 and with N processes (torchrun).

Each run is the whole command a user types, timed from start to exit (start-up, model load,
one composite trace per process, the prompts, the merge), on a fresh output file:

    1 process:   python -m lxt.cli explain --file P --jsonl OUT --quiet [--model M]
    N processes: python -m torch.distributed.run --standalone --nproc-per-node N \\
                     -m lxt.cli explain --file P --jsonl OUT --quiet [--model M]

P holds the first ``--prompts`` prompts of ``lxt_bench/prompts.txt`` (repeated if more are
asked for).  torchrun gives each process one thread (``OMP_NUM_THREADS=1``); the single process
uses torch's default (every core).  Runs alternate between the settings; the median of
``--runs`` is reported, as prompts/s and as the ratio to one process.

    .venv/bin/python benchmarks/corpus.py [--prompts 60] [--runs 3] [--nproc 2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from lxt_bench.faithfulness import _environment, load_prompts  # noqa: E402


def timed(cmd: list, out: Path) -> float:
    out.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", help="a model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    pool = load_prompts()
    prompts = [pool[i % len(pool)] for i in range(args.prompts)]
    tmp = Path(tempfile.mkdtemp(prefix="lxt-corpus-bench-"))
    file, out = tmp / "prompts.txt", tmp / "out.jsonl"
    file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    tail = ["-m", "lxt.cli", "explain", "--file", str(file), "--jsonl", str(out), "--quiet",
            "--batch-size", str(args.batch_size)] + (["--model", args.model] if args.model else [])
    commands = {1: [sys.executable, *tail],
                args.nproc: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={args.nproc}", *tail]}
    seconds = {n: [] for n in commands}
    for r in range(args.runs):
        for n, cmd in commands.items():
            seconds[n].append(timed(cmd, out))
            assert len(out.read_text().splitlines()) == len(prompts)
            print(f"run {r + 1}: {n} process(es): {seconds[n][-1]:.1f} s", flush=True)
    med = {n: statistics.median(s) for n, s in seconds.items()}
    rate = {n: len(prompts) / m for n, m in med.items()}
    for n in commands:
        print(f"{n} process(es): median {med[n]:.1f} s, {rate[n]:.2f} prompts/s, "
              f"x{rate[n] / rate[1]:.2f} of one process")
    if args.json:
        res = {"benchmark": "corpus", "environment": _environment(),
               "settings": {"prompts": len(prompts), "prompts_file": "lxt_bench/prompts.txt",
                            "model": args.model or "SmolLM2-135M-Instruct (lxt_data, float32)",
                            "method": "attnlrp", "batch_size": args.batch_size, "runs": args.runs,
                            "timed": "whole command, start to exit",
                            "commands": {str(n): " ".join(c[1:]) for n, c in commands.items()}},
               "seconds": {str(n): s for n, s in seconds.items()},
               "median_seconds": {str(n): m for n, m in med.items()},
               "prompts_per_second": {str(n): r for n, r in rate.items()},
               "ratio_to_one_process": {str(n): r / rate[1] for n, r in rate.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
