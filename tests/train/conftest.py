"""Compose the real train config with tiny overrides; outputs under tmp_path."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF

# conf/debug/fast.yaml: a model and recipe small enough that a two-stage run takes
# seconds on 2 cores (seq64: 40,960 tokens, then seq128: 24,576; 4,096 tokens per step).
SMALL = ["debug=fast", "train.checkpoint_every_n_steps=4", "data.num_workers=0"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """The embedded sample data, built once for the session (as `python train.py` would)."""
    from danube.data.sample import ensure_sample_data

    root = tmp_path_factory.mktemp("data")
    ensure_sample_data(root / "sample", vocab_size=4096)
    return root


@pytest.fixture
def small_run(tmp_path, data_root):
    """Overrides for a seconds-long two-stage run in tmp_path."""
    return [*SMALL, f"paths.data_dir={data_root}", f"paths.runs_dir={tmp_path}/runs", f"run_dir={tmp_path}/run"]


# The distributed tests' config: two ranks (gloo), a checkpoint every 3 steps (a kill lands between checkpoints).
TWO_RANKS = [*SMALL, "trainer.accelerator=cpu", "trainer.strategy=ddp", "train.checkpoint_every_n_steps=3"]


@pytest.fixture(scope="session")
def two_processes(tmp_path_factory, data_root):
    """TWO_RANKS run as two local processes (Lightning starts the second): what a SLURM job or two torchrun nodes
    must equal bit for bit. One run for the session: the launches it is compared with share it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run_dir = tmp_path_factory.mktemp("two_processes") / "run"
    cmd = [sys.executable, "train.py", *TWO_RANKS, "trainer.devices=2", f"paths.data_dir={data_root}",
           f"run_dir={run_dir}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return run_dir
