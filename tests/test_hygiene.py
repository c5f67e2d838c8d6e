"""The checkout stays clean: what the README's commands write is ignored, and the suite writes nothing into it."""

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, files_written_since


def test_files_written_since_sees_new_files_but_not_caches(tmp_path):
    (tmp_path / "src" / "__pycache__").mkdir(parents=True)
    (tmp_path / ".venv").mkdir()
    (tmp_path / "old.txt").write_text("before")
    since = time.time()
    os.utime(tmp_path / "old.txt", (since - 10, since - 10))
    (tmp_path / "runs" / ".hydra").mkdir(parents=True)
    for f in ("runs/.hydra/train.log", "src/__pycache__/x.pyc", ".venv/lib.py", "new.md"):
        (tmp_path / f).write_text("x")
        os.utime(tmp_path / f, (since + 1, since + 1))
    assert files_written_since(tmp_path, since) == ["new.md", "runs/.hydra/train.log"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("path", ["models/danube-base/config.yaml", "results/table1.md", "hf/danube-base/config.json",
                                  "runs/tiny/seq256/model/config.yaml", "data/chat/messages.jsonl"])
def test_what_the_readme_writes_is_ignored(path):
    proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert proc.returncode == 0, f"{path} is not git-ignored"
