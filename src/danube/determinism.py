"""Same config, same machine, same seed: the same bits, invocation after invocation.

Seeds fix what a run draws; what else can change a float from one invocation to the next
is *how* a sum is taken. On CPU that is Intel MKL's choice of code path (it may pick one by
the memory alignment of each operand, and, with dynamic threading, how many threads share
a matrix product) and the number of intra-op threads (each splits reductions its own way).
:func:`configure` pins all three when ``train.deterministic`` is on:

* ``MKL_CBWR=AUTO`` (MKL's conditional numerical reproducibility: one code path for this
  CPU, whatever the alignment) and ``MKL_DYNAMIC=FALSE``. MKL reads both at its first
  call, so a process that has already multiplied matrices keeps its earlier mode (the
  scripts call this before any).
* ``torch.set_num_threads(train.threads)`` (default: torch's own choice, recorded);
* ``torch.use_deterministic_algorithms`` (Lightning's ``Trainer(deterministic=...)``).

A resumed run is bit-exact with an uninterrupted one only on the same thread count: the
history header records it, and a resume on another count says so.
"""

from __future__ import annotations

import os
import platform

import torch

CHOICES = ("auto", True, False)


def wanted(setting, accelerator: str) -> bool:
    """``train.deterministic``: ``auto`` is on for CPU runs, off on GPUs (slower kernels there)."""
    if setting not in CHOICES:
        raise ValueError(f"train.deterministic={setting!r}; allowed: auto, true, false")
    return accelerator == "cpu" if setting == "auto" else bool(setting)


def configure(deterministic: bool, threads: int | None) -> dict[str, object]:
    """Pin what decides the order of floating-point sums; returns the facts the history records."""
    if deterministic:
        os.environ.setdefault("MKL_CBWR", "AUTO")
        os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    if threads is not None:
        torch.set_num_threads(int(threads))
    return runtime(deterministic)


def runtime(deterministic: bool) -> dict[str, object]:
    """What this process computes with: the torch build, its threads, MKL's mode, the CPU."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "off"),
        "deterministic": deterministic,
        "machine": platform.machine(),
    }
