"""The corpus pipeline (danube.corpus) on datatrove: inputs as corpora ship, tasks, resume, determinism."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from danube.corpus.inputs import BadRecord
from danube.corpus.prepare import prepare, work_dir_of
from danube.data.prepare import read_manifest
from danube.data.tokenizer import Tokenizer
from tests.conftest import REPO
from tests.data.conftest import make_docs, read_stream, split_docs, write_jsonl


def _decoded(out: Path, sp_model: Path, split: str = "train") -> list[str]:
    tok = Tokenizer(sp_model)
    return [tok.decode(d) for d in split_docs(read_stream(out / split), tok.bos_id, tok.eos_id)]


def _write_zst(path: Path, docs: list[str]) -> Path:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    return path


def _chunks(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.bin"))}


def test_zst_gz_globs_and_urls_read_as_one_corpus_in_order(tmp_path, sp_model):
    docs = make_docs(60)
    _write_zst(tmp_path / "in" / "a.jsonl.zst", docs[:20])
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[20:40])
    write_jsonl(tmp_path / "in" / "c.jsonl", docs[40:])
    m = prepare([str(tmp_path / "in" / "*.jsonl*")], tmp_path / "glob", sp_model, val_fraction=0.0, num_workers=1)
    assert _decoded(tmp_path / "glob", sp_model) == docs
    assert [Path(s["path"]).name for s in m["sources"]] == ["a.jsonl.zst", "b.jsonl.gz", "c.jsonl"]
    assert [s["train"]["documents"] for s in m["sources"]] == [20, 20, 20]
    prepare([f"file://{tmp_path / 'in'}"], tmp_path / "url", sp_model, val_fraction=0.0, num_workers=1)
    assert _chunks(tmp_path / "url") == _chunks(tmp_path / "glob")
    assert not work_dir_of(tmp_path / "url").exists()  # the work is gone once the dataset is whole


def test_memory_filesystem_urls_stream_through_fsspec(tmp_path, sp_model):
    import fsspec

    docs = make_docs(25)
    fs = fsspec.filesystem("memory")
    with fs.open("/corpus/part-0.jsonl", "w") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    prepare(["memory:///corpus/*.jsonl"], tmp_path / "out", sp_model, text_field="body", val_fraction=0.0,
            num_workers=1)
    assert _decoded(tmp_path / "out", sp_model) == docs


@pytest.mark.parametrize("content, message", [
    (b"\x28\xb5\x2f\xfd garbage that is no zstd frame", r"bad\.jsonl\.zst: corrupt zstd file \(zstd decompress error: Data corruption detected\)"),
])
def test_a_corrupt_zst_is_named(tmp_path, sp_model, content, message):
    (tmp_path / "bad.jsonl.zst").write_bytes(content)
    with pytest.raises(BadRecord, match=message):
        prepare([tmp_path / "bad.jsonl.zst"], tmp_path / "out", sp_model, num_workers=1)
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_line_is_named_with_its_line_and_skip_bad_counts_it(tmp_path, sp_model):
    lines = [json.dumps({"text": d}).encode() for d in make_docs(6)]
    lines.insert(2, b'{"text": "caf\xe9"}')
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadRecord, match=r"latin1\.jsonl:3: not valid UTF-8 .*--skip-bad"):
        prepare([tmp_path / "latin1.jsonl"], tmp_path / "out", sp_model, num_workers=1)
    assert work_dir_of(tmp_path / "out").is_dir()  # kept: the other tasks' work is not lost
    m = prepare([tmp_path / "latin1.jsonl"], tmp_path / "out", sp_model, num_workers=1, skip_bad=True)
    assert m["sources"][0]["bad_lines"] == 1 and m["totals"]["documents"] == 6


def test_the_output_depends_on_the_task_count_not_the_workers(tmp_path, sp_model):
    docs = make_docs(400)
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"part-{i}.jsonl", docs[i * 100:(i + 1) * 100])
    runs = {}
    for name, tasks, workers in (("t4w1", 4, 1), ("t4w2", 4, 2), ("t2w2", 2, 2)):
        m = prepare([tmp_path / "in"], tmp_path / name, sp_model, val_fraction=0.1, num_workers=workers, tasks=tasks,
                    chunk_bytes="4KB")
        runs[name] = m
    assert _chunks(tmp_path / "t4w1") == _chunks(tmp_path / "t4w2")
    assert runs["t4w1"]["pipeline"]["tasks"] == 4 and runs["t2w2"]["pipeline"]["tasks"] == 2
    for split in ("train", "val"):  # another task count cuts chunks elsewhere: the same documents, in order
        assert _decoded(tmp_path / "t2w2", sp_model, split) == _decoded(tmp_path / "t4w1", sp_model, split)
    assert sorted(_decoded(tmp_path / "t4w1", sp_model) + _decoded(tmp_path / "t4w1", sp_model, "val")) == sorted(docs)
    assert read_manifest(tmp_path / "t4w1")["totals"] == runs["t4w1"]["totals"]


def _prepare_cmd(inputs: Path, out: Path, sp_model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "danube.cli", "prepare", str(inputs), "-o", str(out), "--tokenizer", str(sp_model),
            "--workers", "1", "--tasks", "40", "--chunk-bytes", "256KB", *extra]


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_ends_with_the_bytes_of_an_uninterrupted_one(tmp_path, sp_model):
    """SIGKILL while tasks are running; the rerun skips the finished ones and redoes the rest from their start."""
    docs = make_docs(400)
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(30):  # ~25 MB: 40 tasks of ~0.6 MB, each a fraction of a second
            f.writelines(json.dumps({"text": f"{i} {d}"}) + "\n" for d in docs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_prepare_cmd(src, straight, sp_model), cwd=REPO, env=env, check=True, capture_output=True)
    out = tmp_path / "out"
    work = work_dir_of(out)
    proc = subprocess.Popen(_prepare_cmd(src, out, sp_model), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (len(list(work.glob("tasks/0000[0-9]"))) >= 3 and list(work.glob("tasks/*.tmp"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len([p for p in work.glob("tasks/*") if not p.name.endswith(".tmp")])
    again = subprocess.run(_prepare_cmd(src, out, sp_model), cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"({done} done before)" in again.stderr
    assert _chunks(out) == _chunks(straight)
    manifest, reference = read_manifest(out), read_manifest(straight)
    assert manifest["totals"] == reference["totals"] and manifest["sources"] == reference["sources"]
    assert not work.exists()


def test_changed_inputs_start_an_unfinished_run_over(tmp_path, sp_model, caplog):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(BadRecord, match=r"b\.jsonl:2: not valid JSON"):
        prepare([src, bad], tmp_path / "out", sp_model, num_workers=1)
    write_jsonl(bad, make_docs(5, offset=50))  # fixed: another size and time
    m = prepare([src, bad], tmp_path / "out", sp_model, num_workers=1)
    assert "changed since that unfinished run; starting it over" in caplog.text
    assert m["totals"]["documents"] == 15


@pytest.mark.slow
def test_on_the_slurm_cluster_the_tasks_are_a_job_array_and_the_bytes_those_of_the_local_run(slurm, tmp_path,
                                                                                              sp_model):
    """datatrove's SLURM executor on the one-machine cluster: 4 tasks as an array job, the merge after it."""
    from tests.conftest import wait_slurm_job

    docs = make_docs(200)
    for i in range(4):
        write_jsonl(tmp_path / "in" / f"part-{i}.jsonl", docs[i * 50:(i + 1) * 50])
    prepare([tmp_path / "in"], tmp_path / "local", sp_model, val_fraction=0.1, tasks=4, num_workers=2,
            chunk_bytes="4KB")
    out = tmp_path / "cluster"
    cmd = [sys.executable, "-m", "danube.cli", "prepare", str(tmp_path / "in"), "-o", str(out), "--tokenizer",
           str(sp_model), "--val-fraction", "0.1", "--tasks", "4", "--chunk-bytes", "4KB",
           "--executor", "slurm", "--partition", "debug", "--time", "10:00"]
    sub = subprocess.run(cmd, cwd=REPO, env=slurm, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr[-3000:]
    tasks_job, merge_job = re.search(r"submitted SLURM job (\d+) \(the tasks\) and (\d+)", sub.stdout).groups()
    assert wait_slurm_job(slurm, merge_job)["JobState"] == "COMPLETED", sub.stdout
    assert wait_slurm_job(slurm, tasks_job)["JobState"] == "COMPLETED"
    assert _chunks(out) == _chunks(tmp_path / "local")
    cluster, local = read_manifest(out), read_manifest(tmp_path / "local")
    assert cluster["totals"] == local["totals"] and cluster["sources"] == local["sources"]
    work = work_dir_of(out)
    assert sorted(p.name for p in work.iterdir()) == ["datatrove", "merge", "slurm_logs"]  # logs only
    assert len(list((work / "datatrove" / "completions").iterdir())) == 4


@pytest.fixture
def fake_hub(monkeypatch):
    """``hf://`` served from memory: the Hub's fsspec filesystem as far as listing and reading go."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Hub(MemoryFileSystem):
        protocol = ("hf",)
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol("memory://" + path.removeprefix("hf://"))

    fsspec.register_implementation("hf", Hub, clobber=True)
    yield Hub()
    from huggingface_hub import HfFileSystem

    fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def test_a_hub_dataset_id_reads_the_dataset_s_files(fake_hub, tmp_path, sp_model, monkeypatch):
    docs = make_docs(30)
    with fake_hub.open("/datasets/someorg/somecorpus/data/train-0.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    fake_hub.pipe("/datasets/someorg/somecorpus/README.md", b"# not data")
    monkeypatch.chdir(tmp_path)  # "someorg/somecorpus" is no local path here
    m = prepare(["someorg/somecorpus"], tmp_path / "out", sp_model, val_fraction=0.0, num_workers=1)
    assert _decoded(tmp_path / "out", sp_model) == docs
    (source,) = m["sources"]  # README.md is no data
    assert source["path"].startswith("hf://") and source["path"].endswith("datasets/someorg/somecorpus/data/train-0.jsonl")


def test_an_unreachable_remote_input_is_one_line(tmp_path, sp_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    """No network here: offline (HF_HUB_OFFLINE read at import) or a failed connection, one line either way."""
    with pytest.raises(FileNotFoundError, match=r"^nobody/nothing(: neither a local path nor a Hub dataset found| "
                                                r"\(as hf://datasets/nobody/nothing\): cannot be listed \(\w+)"):
        prepare(["nobody/nothing"], tmp_path / "out", sp_model, num_workers=1)
