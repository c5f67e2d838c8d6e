"""Shared fixtures: tiny models and configs composed from the real conf/ tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import danube.config  # noqa: F401  registers the schemas conf/*.yaml are composed against
from danube.model import DanubeConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# What a session may leave in the checkout: caches and the environment it runs in.
_OWN = {".git", ".venv", "__pycache__", ".pytest_cache", ".ci"}


def files_written_since(root: Path, since: float) -> list[str]:
    """Files under ``root`` created or modified after ``since`` (caches and virtualenvs left out)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _OWN and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                if path.lstat().st_mtime >= since:
                    out.append(str(path.relative_to(root)))
            except FileNotFoundError:  # removed while we looked
                continue
    return sorted(out)


def pytest_configure(config):
    # Every command the tests run (in-process or shelled out) resolves paths.root_dir from
    # DANUBE_HOME: point it at a scratch directory, so nothing lands in the checkout's
    # runs/ or data/ (a user's own DANUBE_HOME is not touched either).
    config._danube_home = tempfile.mkdtemp(prefix="danube-tests-")
    os.environ["DANUBE_HOME"] = config._danube_home
    config._danube_started = time.time() - 1  # mtime granularity


def pytest_unconfigure(config):
    home = getattr(config, "_danube_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if it wrote into the checkout: the suite must leave `git status` as it found it."""
    written = files_written_since(REPO, session.config._danube_started)
    if written:
        shown = "\n  ".join(written[:20]) + ("\n  ..." if len(written) > 20 else "")
        session.config.get_terminal_writer().line(
            f"\nthe test session wrote {len(written)} file(s) into the checkout {REPO} (tests must write under "
            f"tmp_path or $DANUBE_HOME; if you edited files while the tests ran, run them again):\n  {shown}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def micro_cfg() -> DanubeConfig:
    """A model small enough for float64 parity checks, window shorter than the test sequences."""
    return DanubeConfig(
        vocab_size=211, n_embd=64, intermediate_size=96, n_layer=2, n_head=4, n_kv_head=2,
        sliding_window=7, max_seq_len=128, rope_theta=500.0, rms_norm_eps=1e-6,
    )


def corpus_lines(n_docs: int = 400) -> list[str]:
    """Plain English prose that ships with CPython (pydoc_data): no download needed."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    lines = [line for line in text.splitlines() if len(line.split()) > 3]
    return lines[: n_docs * 10]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A 1,000-piece SentencePiece model trained on pydoc text, shared by the session."""
    from danube.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n2024 1234567 3.14159\n")
    return train_tokenizer([root / "corpus.txt"], root / "tok.model", vocab_size=1000)


MISTRAL_TOKENIZER = REPO / "tests" / "assets" / "mistral" / "tokenizer.model"


@pytest.fixture(scope="session")
def mistral_model() -> Path:
    """The real Mistral-7B tokenizer (32,000 pieces, dummy prefix): H2O-Danube2's."""
    return MISTRAL_TOKENIZER


@pytest.fixture(scope="session")
def llama2_style_model(tmp_path_factory) -> Path:
    """A 1,000-piece tokenizer trained with Llama 2's settings: dummy prefix, identity, byte fallback, digits split."""
    from danube.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok_llama2")
    (root / "corpus.txt").write_text("\n".join(corpus_lines()) + "\n2024 1234567 3.14159\n    indented\tand tabbed\n")
    return train_tokenizer([root / "corpus.txt"], root / "llama2_style.model", vocab_size=1000, add_dummy_prefix=True)


# -- the local SLURM cluster (tests/train/test_slurm.py, tests/data/test_corpus.py) ------------------
@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """The environment for sbatch/squeue/scontrol of the one-machine SLURM cluster (slurm/local_cluster.sh:
    up, or brought up here; both need root, and apt-get when the packages are missing)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (slurm/local_cluster.sh); not root here")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it (Debian: slurm-wlm munge)")
    up = subprocess.run(["bash", "slurm/local_cluster.sh", "up"], cwd=REPO, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    conf = subprocess.run(["bash", "slurm/local_cluster.sh", "env"], cwd=REPO, capture_output=True, text=True)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # the scripts' `python` is this one
    return {**os.environ, "SLURM_CONF": conf.stdout.strip().split("=", 1)[1], "PYTHONUNBUFFERED": "1", "PATH": path}


def slurm_job(env: dict, job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_slurm_job(env: dict, job: str, timeout: float = 600) -> dict[str, str]:
    """Wait for the job to end; a requeued job is let start at once (SLURM holds it ~2 minutes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = slurm_job(env, job)
        state = info.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True)
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"SLURM job {job} did not end in {timeout} s: {slurm_job(env, job)}")
