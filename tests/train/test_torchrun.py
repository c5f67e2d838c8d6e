"""The README's multi-node torchrun line, run for real: two "nodes" of one CPU process each on localhost.

Same rendezvous as on a cluster (c10d), with gloo and ``trainer.accelerator=cpu
trainer.devices=1`` in place of 8 GPUs per node; the run must equal the same config on two
local processes (``trainer.devices=2``, started by Lightning) bit for bit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.train.conftest import TWO_RANKS

pytestmark = pytest.mark.slow

ARGS = TWO_RANKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(data_root, run_dir, port: int) -> list[subprocess.Popen]:
    """The README's torchrun line on two "nodes", each in its own session (a node's processes die together)."""
    env = {**os.environ, "NUM_NODES": "2"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return [subprocess.Popen([*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "train.py",
                              "trainer=multinode", "trainer.accelerator=cpu", "trainer.devices=1", *ARGS,
                              f"paths.data_dir={data_root}", f"run_dir={run_dir}"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for rank in (0, 1)]


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL to a node's torchrun agent and its workers (torchrun starts each worker in a session of its own)."""
    workers = subprocess.run(["pgrep", "-P", str(node.pid)], capture_output=True, text=True).stdout.split()
    node.kill()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)


def test_two_torchrun_nodes_train_what_two_local_processes_train_through_a_node_lost(data_root, two_processes,
                                                                                    tmp_path):
    """A node killed after the first checkpoint: the other exits non-zero within seconds; the relaunch resumes.

    The relaunched job ends equal, bit for bit, to two local processes (``trainer.devices=2``).
    """
    local = two_processes
    run_dir = tmp_path / "nodes"
    nodes = _nodes(data_root, run_dir, _free_port())
    first = run_dir / "seq64" / "checkpoints" / "step00000003.ckpt"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.1)
    # The node of global rank zero (which hosts the rendezvous store, whichever it is) or the other: both must end.
    victim, survivor = nodes
    _kill_node(victim)
    start = time.monotonic()
    out = survivor.communicate(timeout=120)[0]
    victim.communicate()
    assert survivor.returncode not in (0, None), out[-3000:]
    assert time.monotonic() - start < 60, "the surviving node went on too long"
    assert not (run_dir / "seq128" / "complete.json").exists()

    nodes = _nodes(data_root, run_dir, _free_port())
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sum(o.count("train.py done in") for o in outs) == 1  # global rank zero reports, whichever node it is
    assert any("resuming" in o.lower() for o in outs), "the relaunch did not resume"
    wa, wb = (load_file(str(Path(d) / "seq128" / "model" / "model.safetensors")) for d in (local, run_dir))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for stage in ("seq64", "seq128"):
        assert (local / stage / "data" / "steps.jsonl").read_text() == \
            (run_dir / stage / "data" / "steps.jsonl").read_text()
