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
