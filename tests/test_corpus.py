"""Explaining a corpus (lxt.corpus, ``lxt explain --file --jsonl``): sharded over torchrun
ranks, resumable, crash-safe.  Every multi-process result is compared with an independent
single-process run of the same command."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lxt import corpus
from lxt.cli import main

#: a method without a composite trace keeps these tests cheap (the sharding, resume and merge
#: do not depend on it); the AttnLRP path is run with accelerate's device map below
METHOD = "input_x_gradient"
WORDS = "the capital of france is paris a cat sat on mat and dog ran in park big red city".split()


def prompt_file(path, n, seed=0):
    """``n`` lines of 3-9 words; line 3 is blank and line 6 longer than the context (64)."""
    g = torch.Generator().manual_seed(seed)
    lines = [" ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (int(k),), generator=g))
             for k in torch.randint(3, 10, (n,), generator=g)]
    lines[2], lines[5] = "", "the dog " * 40
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_same_records(got, expected):
    """Record by record: same index, key, tokens, target, error; relevance and logit to
    float32 round-off (batches are composed differently)."""
    assert [r["index"] for r in got] == [r["index"] for r in expected]
    for g, e in zip(got, expected):
        assert g["key"] == e["key"] and g["error"] == e["error"] and g["prompt"] == e["prompt"]
        if e["error"] is None:
            assert g["tokens"] == e["tokens"] and g["target_id"] == e["target_id"]
            assert torch.allclose(torch.tensor(g["relevance"]), torch.tensor(e["relevance"]),
                                  rtol=1e-4, atol=1e-5), g["index"]
            assert g["logit"] == pytest.approx(e["logit"], rel=1e-4, abs=1e-5)


def explain_file(model_dir, file, out, *extra):
    method = [] if "--method" in extra else ["--method", METHOD]
    return main(["explain", "--file", str(file), "--model", str(model_dir), "--jsonl", str(out),
                 "--quiet", *method, *extra])


def torchrun(model_dir, file, out, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lxt.cli", "explain", "--file", str(file), "--model", str(model_dir),
           "--jsonl", str(out), "--quiet", "--batch-size", "1", "--method", METHOD]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def rank_pid(launcher, rank, timeout=60):
    """The pid of the worker of ``rank`` that torchrun started."""
    import psutil

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "lxt.cli" in " ".join(child.cmdline()):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} worker found")


def test_two_processes_killed_and_restarted_equal_one_process(model_dir, tmp_path):
    """torchrun with 2 ranks (gloo); rank 1 is SIGKILLed after its first batch is written, the
    job fails; the same command again completes it: exactly one record per line, each equal
    to the single-process run's."""
    n = 120
    file = tmp_path / "p.txt"
    prompt_file(file, n)
    assert explain_file(model_dir, file, tmp_path / "ref.jsonl") == 0
    expected = records(tmp_path / "ref.jsonl")
    out = tmp_path / "out.jsonl"
    part1 = corpus.parts_dir(out) / "rank1.jsonl"

    first = torchrun(model_dir, file, out)
    try:
        pid = rank_pid(first, 1)
        t0 = time.monotonic()
        while not (part1.is_file() and part1.stat().st_size) and time.monotonic() - t0 < 90:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        log = first.communicate(timeout=90)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0, log
    assert not out.exists()  # never merged
    done = [json.loads(x) for p in corpus.parts_dir(out).glob("rank*.jsonl")
            for x in p.read_text().splitlines() if x.endswith("}")]
    assert 0 < len(done) < n, "the kill came too late to test a resume"

    second = torchrun(model_dir, file, out)
    log = second.communicate(timeout=120)[0]
    assert second.returncode == 0, log
    assert f"resuming {out}" in log
    got = records(out)
    assert [r["index"] for r in got] == list(range(1, n + 1))  # one record per line, in order
    assert_same_records(got, expected)
    assert got[2]["error"] == "empty prompt" and "longer than the model's context" in got[5]["error"]
    assert not corpus.parts_dir(out).exists()


def test_resume_skips_what_is_done_and_drops_a_torn_line(model_dir, tmp_path, monkeypatch):
    """A killed single-process run (its part file: 4 records, then half a line) is completed
    by the same command, which explains only the prompts not yet written; a complete output
    is left byte for byte."""
    import importlib

    explain_module = importlib.import_module("lxt.explain")  # (lxt.explain is the function)
    file, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    prompt_file(file, 9)
    assert explain_file(model_dir, file, out) == 0
    full = out.read_text(encoding="utf-8").splitlines(keepends=True)
    part = corpus.parts_dir(out) / "rank0.jsonl"
    part.parent.mkdir()
    part.write_text("".join(full[:4]) + full[4][:37], encoding="utf-8")  # a kill mid-write
    out.unlink()
    explained = []
    real = explain_module.explain

    def counting(model, tok, prompts, **kw):
        explained.extend(prompts)
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(explain_module, "explain", counting)
    assert explain_file(model_dir, file, out, "--batch-size", "2") == 0
    lines = file.read_text().split("\n")
    assert explained == [lines[i] for i in (4, 6, 7, 8)]  # not 1-4 (done), 6 (too long)
    assert_same_records(records(out), [json.loads(x) for x in full])
    assert not part.parent.exists()
    before = out.read_bytes()
    explained.clear()
    assert explain_file(model_dir, file, out) == 0
    assert explained == [] and out.read_bytes() == before


def test_output_of_another_job_is_refused_and_kept(model_dir, tmp_path, capsys):
    file, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    lines = prompt_file(file, 6)
    assert explain_file(model_dir, file, out) == 0
    before = out.read_bytes()
    capsys.readouterr()

    def one_line_error(*argv):
        rc = explain_file(model_dir, file, out, *argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("lxt: error:") and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == before  # nothing mixed in, nothing lost
        return err

    err = one_line_error("--method", "gradient")
    assert f"{out} line 1 was computed with other options: method '{METHOD}' (now 'gradient')" in err
    assert "give another output file, or remove it" in err
    file.write_text("\n".join([lines[0], "the big red dog", *lines[2:]]) + "\n")
    assert "line 2 is a result for index 2 with another prompt" in one_line_error()
    file.write_text("\n".join(lines[:2]) + "\n")
    assert "index 3, which this job does not have" in one_line_error()


def test_torchrun_without_jsonl_is_refused(monkeypatch, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the cat\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["explain", "--file", str(tmp_path / "p.txt")]) == 2
    assert "give --jsonl" in capsys.readouterr().err


def test_device_map_auto_is_captured_and_explained(model_dir, tmp_path, recwarn):
    """accelerate's device_map="auto" (here everything lands on the CPU, behind accelerate's
    hooks): the model is captured (no lxt warning) and CP-LRP conserves, which it does not
    with plain gradients through attention (a failed capture)."""
    file = tmp_path / "p.txt"
    file.write_text("the capital of france is\na cat sat on the mat\n")
    out = tmp_path / "a.jsonl"
    assert explain_file(model_dir, file, out, "--device-map", "auto", "--method", "cp-lrp") == 0
    assert not [str(w.message) for w in recwarn if str(w.message).startswith("lxt:")]
    for rec in records(out):
        assert rec["error"] is None and rec["options"]["method"] == "cp-lrp"
        assert sum(rec["relevance"]) == pytest.approx(rec["logit"], rel=1e-3)


def test_file_without_jsonl_shows_each_line_and_names_the_bad_ones(model_dir, tmp_path, capsys):
    file = tmp_path / "p.txt"
    file.write_text("the cat sat\n\nthe dog ran\n")
    assert main(["explain", "--file", str(file), "--model", str(model_dir), "--method", METHOD]) == 0
    out, err = capsys.readouterr()
    assert "cat" in out and "dog" in out
    assert f"{file} line 2: empty prompt" in err and "1 of 3 prompts failed" in err
    assert list(tmp_path.iterdir()) == [file]  # no file written
