"""The benchmark scripts run as a user runs them and report parseable figures (never timings checked)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO


def run(script, *args, cwd=REPO, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_train_throughput_quick_ends_with_the_ratio():
    proc = run("train_throughput.py", "--quick", "--no-write")
    m = re.fullmatch(r"ratio_vs_hf=(\d+\.\d+)", last_line(proc))
    assert m and float(m.group(1)) > 0
    assert "transformers" in proc.stdout and "danube" in proc.stdout


@pytest.mark.slow
def test_sequential_sides_are_timed_one_at_a_time_within_the_budget():
    """How CUDA runs the grid (one model in memory at a time, a time budget), here on CPU."""
    args = ["--model", "tiny", "--seq-len", "64", "--sequential", "--repeats", "2", "--no-write"]
    proc = run("train_throughput.py", *args)
    assert re.fullmatch(r"ratio_vs_hf=(\d+\.\d+)", last_line(proc))
    assert re.search(r"^tiny +64 +32 +fp32 +sdpa +danube +\d+\.\d +[\d,]+ .*x$", proc.stdout, re.M)
    proc = run("train_throughput.py", *args, "--time-budget", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("skipped: time budget") == 2  # transformers and danube: nothing started late


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_options_fail_clearly_without_cuda():
    options = ["--model", "danube_1p8b", "--precision", "bf16", "--attention", "flash"]
    proc = run("train_throughput.py", *options, "--no-write")
    assert proc.returncode != 0
    assert "need(s) a CUDA GPU" in proc.stderr
    for flag in ("--model danube_1p8b", "--precision bf16", "--attention flash"):
        assert flag in proc.stderr


def test_data_loading_reports_tokens_per_second(tmp_path, sp_model):
    from danube.corpus.prepare import prepare
    from tests.conftest import corpus_lines

    (tmp_path / "docs.txt").write_text("\n\n".join(corpus_lines(200)))
    prepare([tmp_path / "docs.txt"], tmp_path / "shards", sp_model, num_workers=1, chunk_bytes="64KB")
    proc = run("data_loading.py", "--shards", str(tmp_path / "shards"), "--seq-len", "64", "--micro-batch", "4",
               "--workers", "0", "--sources", "1", "2", "--world", "1", "8", "--global-batch", "64", "48",
               "--tokens", "20000", "--repeats", "1", "--no-write")
    assert re.fullmatch(r"tokens_per_sec=\d+", last_line(proc))
    # Per source count: world 1 (global batch 4), world 8 (32, and 64 with 2 micro-batches per rank; 48 is
    # not a whole number of micro-batches per rank and is skipped).
    rows = re.findall(r"^64 +4 +([12]) +0 +(\d+) +(\d+) +(\d+) ", proc.stdout, re.M)
    assert sorted(rows) == sorted((s, *r) for s in "12" for r in [("1", "4", "1"), ("8", "32", "1"), ("8", "64", "2")])
    assert re.search(r"^lowest: [\d,]+ tokens/s per rank", proc.stdout, re.M)


def test_generation_agrees_with_transformers_and_reports_the_ratio():
    proc = run("generation.py", "--model", "tiny", "--batch", "2", "--new-tokens", "4", "--repeats", "1",
               "--no-write")
    assert re.fullmatch(r"ratio_vs_hf=\d+\.\d+", last_line(proc))
    assert proc.stdout.count(" 2/2 ") == 2  # both rows: greedy tokens equal transformers'


def test_prepare_reports_megabytes_per_second(tmp_path):
    proc = run("prepare.py", "--quick", "--workers", "1", "--repeats", "1", "--no-write",
               "--data-root", str(tmp_path / "sample"))
    assert re.fullmatch(r"mb_per_sec=\d+\.\d+", last_line(proc))


def test_encode_compares_both_libraries_on_the_same_ids(tmp_path):
    proc = run("encode.py", "--quick", "--repeats", "1", "--no-write", "--data-root", str(tmp_path / "sample"))
    rows = [line for line in proc.stdout.splitlines() if " tokenizers " in line]
    assert len(rows) == 2 and all(re.search(r" (\d+)/\1 ", row) for row in rows)  # every document: the same ids


def test_a_section_is_replaced_and_the_others_kept(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import benchlib

    path = tmp_path / "BENCHMARKS.md"
    benchlib.write_section("a", "A", "| x |\n|---|\n| 1 |", path)
    benchlib.write_section("b", "B", "second", path)
    benchlib.write_section("a", "A", "| x |\n|---|\n| 2 |", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks")
    assert "| 2 |" in text and "| 1 |" not in text and "second" in text
    assert text.count("<!-- bench:a -->") == 1 and text.index("bench:a") < text.index("bench:b")
    assert "- machine: " in text and "torch " + torch.__version__ in text


def test_quick_runs_print_only_unless_asked_to_write(monkeypatch):
    """BENCHMARKS.md is tracked: a --quick smoke run must not rewrite it (nor any run given --no-write)."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import benchlib

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    benchlib.add_write_flags(parser)
    decide = lambda *argv: benchlib.should_write(parser.parse_args(list(argv)))  # noqa: E731
    assert decide() and decide("--write") and decide("--quick", "--write")
    assert not decide("--quick") and not decide("--no-write") and not decide("--quick", "--no-write")
    with pytest.raises(SystemExit):
        parser.parse_args(["--write", "--no-write"])


def test_a_failing_side_is_a_row_and_the_others_still_run(monkeypatch):
    """On the device a side that breaks (here: FlexAttention has no CPU backward) must not cost the run."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import train_throughput as tt

    args = argparse.Namespace(device="cpu", micro_batch_tokens=128, activation_checkpointing=False,
                              hf_fused_adamw=False, warmup=1, repeats=1, profile=0, interrupted=False,
                              estimate={"eager": 10.0, "compiled": 45.0})
    group = tt.Group("tiny", 64, [tt.Spec("fp32", "flex"), tt.Spec("fp32", "sdpa")], hf="sdpa", hf_at=2)
    flex, sdpa, hf = tt.run_sequential(args, group, peak=None, deadline=None)
    assert flex.ms is None and flex.status.startswith("error: NotImplementedError: FlexAttention does not support")
    assert sdpa.ms > 0 and hf.side == "transformers" and hf.vs_hf == 1.0
    assert sdpa.vs_hf == pytest.approx(hf.ms / sdpa.ms)
