"""The README's multi-node torchrun line, run for real: two "nodes" of one CPU process each on localhost.

Same rendezvous as on a cluster (c10d), with gloo and ``trainer.accelerator=cpu
trainer.devices=1`` in place of 8 GPUs per node; the run must equal the same config on two
local processes (``trainer.devices=2``, started by Lightning) bit for bit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.conftest import SMALL

pytestmark = pytest.mark.slow

ARGS = [*SMALL, "train.checkpoint_every_n_steps=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_what_two_local_processes_train(data_root, tmp_path):
    local = tmp_path / "local"
    subprocess.run([sys.executable, "train.py", *ARGS, "trainer.devices=2", "trainer.strategy=ddp",
                    f"paths.data_dir={data_root}", f"run_dir={local}"], cwd=REPO, check=True, capture_output=True)
    run_dir = tmp_path / "nodes"
    port = _free_port()
    env = {**os.environ, "NUM_NODES": "2"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    nodes = [subprocess.Popen([*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "train.py",
                               "trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=1", *ARGS,
                               f"paths.data_dir={data_root}", f"run_dir={run_dir}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sum(o.count("train.py done in") for o in outs) == 1  # global rank zero reports, whichever node it is
    wa, wb = (load_file(str(Path(d) / "seq128" / "model" / "model.safetensors")) for d in (local, run_dir))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for stage in ("seq64", "seq128"):
        assert (local / stage / "data" / "steps.jsonl").read_text() == \
            (run_dir / stage / "data" / "steps.jsonl").read_text()
