"""The cost benchmark runs on a tiny model (so it does not rot); it times nothing itself."""
import torch

from lxt_bench.speed import benchmark, saved_bytes
from models import tiny_llama


def test_speed_benchmark_structure():
    model = tiny_llama("sdpa", torch.float32)
    lines = []
    info = benchmark(model, [8, 12], runs=1, ig_steps=2, log=lines.append)
    assert [r["tokens"] for r in info["rows"]] == [8, 12] and len(lines) == 2
    for row in info["rows"]:
        for name in ("attnlrp", "cp-lrp"):
            assert row[f"{name}_time_ratio"] > 0 and row[f"{name}_walks"] <= 2
            assert row[f"{name}_saved_mb"] > 0
        assert row["ig_s"] > 0
    assert all(not p.requires_grad for p in model.parameters())  # frozen, as in the benchmark


def test_saved_bytes_counts_activations_not_weights():
    model = tiny_llama("sdpa", torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    emb = torch.randn(1, 16, 32)
    small = saved_bytes(model, emb, 3)
    big = saved_bytes(model, torch.randn(1, 64, 32), 3)
    assert 0 < small < big  # grows with the sequence, weights excluded


def test_notebook_and_depth_rows_structure():
    from lxt_bench.speed import NOTEBOOK, depth_rows, notebook
    from models import WORDS, tiny_tokenizer

    model = tiny_llama("sdpa", torch.float32)
    lines = []
    tok = tiny_tokenizer(lowercase=True, words=[*WORDS, "london"])
    out = notebook(model, tok, runs=1, log=lines.append)
    assert out["calls"] == len(NOTEBOOK) == 7 and len(lines) == 1
    assert out["grad_s"] > 0 and out["attnlrp_time_ratio"] > 0 and out["cp-lrp_time_ratio"] > 0
    rows = depth_rows([2, 3], tokens=4, runs=1, log=lines.append)
    assert [r["layers"] for r in rows] == [2, 3] and all(r["attnlrp_first_s"] > 0 for r in rows)
