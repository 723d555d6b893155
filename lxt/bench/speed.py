"""Cost of one AttnLRP explanation relative to plain input x gradient, same model, same inputs,
same process: median of N runs after warm-up.

Memory, two ways: the bytes of all tensors kept for backward (saved tensors, model weights
excluded; deterministic), and the peak RSS increase over the call (sampled; glibc's mmap
threshold is fixed so that freed tensors go back to the OS and RSS follows live memory).

    lxt bench speed [--lengths 32 128 512 1024] [--runs 5] [--json out.json]
    .venv/bin/python benchmarks/speed.py ...   (the same)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import statistics
import threading
import time

import psutil
import torch

import lxt.composites
from lxt.models import load_smollm2


class PeakRSS:
    """Peak resident memory above the starting point while the block runs (sampled)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.start


def one_call(model, emb, target):
    x = emb.clone().requires_grad_()
    # as lxt.explain calls it: only the explained position goes through the LM head
    logit = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target]
    logit.backward(logit)
    return x.grad


def saved_bytes(model, emb, target) -> int:
    """Bytes of the distinct storages kept for backward by one forward (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = emb.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logit = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1, target]
    del logit
    return sum(seen.values())


def measure(model, emb, target, runs):
    times, mems = [], []
    one_call(model, emb, target)  # warm-up (and capture, for the composite)
    for _ in range(runs):
        with PeakRSS() as mem:
            t = time.perf_counter()
            one_call(model, emb, target)
            times.append(time.perf_counter() - t)
        mems.append(mem.delta)
    return statistics.median(times), statistics.median(mems)


def main(argv=None, reexec: bool = False):
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and (argv is None or reexec):
        # fixed mmap threshold: large tensors are returned to the OS when freed (RSS = live)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    p = argparse.ArgumentParser(prog="lxt bench speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    model, tok = load_smollm2()
    for prm in model.parameters():
        prm.requires_grad_(False)
    rows = []
    comp = lxt.composites.attnlrp(model)
    t = time.perf_counter()
    comp.register(model)
    register_s = time.perf_counter() - t
    comp.remove()
    for n in args.lengths:
        torch.manual_seed(0)
        ids = torch.randint(10, 40000, (1, n))
        emb = model.get_input_embeddings()(ids).detach()
        base_t, base_m = measure(model, emb, 42, args.runs)
        base_saved = saved_bytes(model, emb, 42)
        with comp.context(model):
            t0 = time.perf_counter()
            one_call(model, emb, 42)
            first_s = time.perf_counter() - t0
            lrp_t, lrp_m = measure(model, emb, 42, args.runs)
            lrp_saved = saved_bytes(model, emb, 42)
            graphs = len(comp._capture.graphs)
        rows.append({"tokens": n, "grad_s": base_t, "attnlrp_s": lrp_t, "time_ratio": lrp_t / base_t,
                     "grad_peak_mb": base_m / 2**20, "attnlrp_peak_mb": lrp_m / 2**20,
                     "mem_ratio": lrp_m / max(base_m, 1), "first_call_s": first_s, "graphs": graphs,
                     "grad_saved_mb": base_saved / 2**20, "attnlrp_saved_mb": lrp_saved / 2**20,
                     "saved_ratio": lrp_saved / max(base_saved, 1)})
        r = rows[-1]
        print(f"{n:5d} tokens  input x gradient {r['grad_s']*1e3:8.1f} ms  AttnLRP {r['attnlrp_s']*1e3:8.1f} ms"
              f"  ratio {r['time_ratio']:.2f}   peak +{r['grad_peak_mb']:.0f} / +{r['attnlrp_peak_mb']:.0f} MB"
              f"  ratio {r['mem_ratio']:.2f}   saved for backward {r['grad_saved_mb']:.0f} / "
              f"{r['attnlrp_saved_mb']:.0f} MB ratio {r['saved_ratio']:.2f}   first call {first_s:.1f} s",
              flush=True)
    info = {"machine": platform.machine(), "cpus": psutil.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "register_s": register_s, "rows": rows}
    print(f"register(): {register_s*1e3:.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
