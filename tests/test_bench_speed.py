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


def test_image_text_row_structure():
    """The image-text row on its tiny LLaVA: every view and method measured (no timing
    assertions), the relevance reaching text tokens and pixels, the model left unpatched."""
    from lxt_bench.speed import LLAVA_PROMPT, image_text_row, tiny_llava, vlm_call

    lines = []
    out = image_text_row(runs=1, log=lines.append)
    assert len(lines) == 3 and out["tokens"] == 16 + len(LLAVA_PROMPT.split())
    for view in ("registered", "explain_registered", "explain"):
        assert out[view]["grad_s"] > 0
        for name in ("attnlrp", "cp-lrp"):
            assert out[view][f"{name}_s"] > 0 and out[view][f"{name}_time_ratio"] > 0
    assert all(out["registered"][f"{n}_saved_mb"] > 0 for n in ("grad", "attnlrp", "cp-lrp"))

    import lxt.composites

    model, processor = tiny_llava()
    from PIL import Image

    batch = dict(processor(text=["<image>" + LLAVA_PROMPT], images=[Image.new("RGB", (20, 20), (90, 30, 200))],
                           return_tensors="pt"))
    with torch.no_grad():
        model(**batch)
    with lxt.composites.attnlrp(model).context(model):
        text, pixels = vlm_call(model, batch, 3)
    assert text.abs().sum() > 0 and pixels.abs().sum() > 0
    assert not any(type(m).__module__.startswith("lxt") for m in model.modules())
