"""Every precision option with every trainer and optim option; bf16 pretraining end to end on CPU."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from danube.model.loading import load_model
from danube.plot import read_scalars
from danube.tasks.train import run, validate
from tests.train.conftest import SMALL, compose_train
from tests.train.test_configs import options

PRECISIONS = {
    "fp32": ["precision=fp32"],
    "bf16": ["precision=bf16"],
    "fp8-te": ["precision=fp8"],  # the report's path: Transformer Engine
    "fp8-torchao": ["precision=fp8", "precision.backend=torchao"],
}
OPTIMS = [[f"optim={o}", f"optim.fused={fused}"] for o in options("optim") for fused in ("auto", "true", "false")]
COMBINATIONS = list(itertools.product(PRECISIONS, options("trainer"), range(len(OPTIMS))))


def refusal(precision: str, trainer: str) -> str | None:
    """What validation must say for a pair that does not go together (None: it must pass)."""
    if precision.startswith("fp8") and trainer == "cpu":
        return "precision=fp8 runs on GPUs"
    if precision == "fp8-te" and "fsdp" in trainer:
        return "backend te and trainer.strategy=fsdp is not supported"
    return None


@pytest.fixture
def hopper_machine(monkeypatch):
    """What validation sees on one 8-GPU H100 node with both FP8 packages installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real = importlib.util.find_spec
    found = importlib.util.find_spec("torch")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: found if name in ("transformer_engine", "torchao") else real(name, *a))


@pytest.mark.parametrize("precision, trainer, optim", COMBINATIONS,
                         ids=[f"{p}-{t}-{'-'.join(OPTIMS[o])}" for p, t, o in COMBINATIONS])
def test_every_precision_goes_with_every_trainer_and_optim(hopper_machine, precision, trainer, optim):
    overrides = [*PRECISIONS[precision], f"trainer={trainer}", *OPTIMS[optim], "model=danube_1p8b"]
    if trainer == "multinode":  # 16 GPUs: ~1.18M does not divide by 16 x 16,384
        overrides.append("train.global_batch_tokens=1_048_576")
    cfg = compose_train(overrides)
    expected = refusal(precision, trainer)
    if expected:
        with pytest.raises(ValueError, match=expected):
            validate(cfg)
    else:
        assert validate(cfg)
        assert cfg.precision.trainer_precision in ("32-true", "bf16-mixed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages shown without CUDA")
@pytest.mark.parametrize("backend, package", [("te", "Transformer Engine"), ("torchao", "torchao")])
def test_fp8_without_cuda_fails_at_start_naming_what_is_missing(backend, package):
    cfg = compose_train(["precision=fp8", f"precision.backend={backend}", "trainer=h100x1"])
    with pytest.raises(RuntimeError, match=f"precision=fp8 needs a CUDA GPU.*{package}.*no CUDA device is visible"):
        validate(cfg)


@pytest.mark.parametrize("backend, install", [("te", r"pip install -e '.\[gpu\]'"), ("torchao", r"pip install -e '.\[fp8\]'")])
def test_fp8_without_its_package_names_the_install(hopper_machine, monkeypatch, backend, install):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match=f"backend {backend}.*{install}"):
        validate(compose_train(["precision=fp8", f"precision.backend={backend}", "trainer=h100x1"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision.backend=apex"], "precision.backend='apex'; allowed: te, torchao"),
        (["precision.backend=torchao", "precision.recipe=blockwise"], "precision.recipe='blockwise'"),
        (["precision.fp8_format=e5m2"], "precision.fp8_format='e5m2'"),
    ],
)
def test_bad_fp8_options_name_the_key(hopper_machine, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_train(["precision=fp8", "trainer=h100x1", *overrides]))


def test_a_trainer_precision_danube_cannot_clip_is_refused():
    with pytest.raises(ValueError, match="precision.trainer_precision='16-mixed'; allowed: 32-true, bf16-mixed"):
        validate(compose_train(["precision=bf16", "precision.trainer_precision=16-mixed"]))


@pytest.mark.slow
def test_debug_fast_pretrains_in_bf16_end_to_end(tmp_path, data_root):
    """`python train.py precision=bf16 debug=fast`: crashed at the first optimizer step (fused AdamW + clipping)."""
    stages = "recipe.stages=[{name: seq64, seq_len: 64, tokens: 12288}, {name: seq128, seq_len: 128, tokens: 4096}]"
    cfg = compose_train([*SMALL, "precision=bf16", stages, "train.log_every_n_steps=1",
                         f"paths.data_dir={data_root}", f"run_dir={tmp_path}/run"])
    result = run(cfg)
    assert result.tokens_seen == 12288 + 4096
    ckpt = torch.load(result.run_dir / "seq128" / "final.ckpt", map_location="cpu", weights_only=False)
    assert all(group["fused"] for group in ckpt["optimizer_states"][0]["param_groups"])  # optim.fused: auto
    scalars = read_scalars(result.run_dir)
    norms = [v for _, v in scalars["train/grad_norm"]]
    assert len(norms) == 4 and all(math.isfinite(v) and v > 0 for v in norms)
    assert all(math.isfinite(v) for _, v in scalars["train/loss"] + scalars["val/loss"])
    assert result.final_val_loss < math.log(4096)  # learnt something in 4 steps
    assert load_model(result.model_dir).cfg.sliding_window == 48


def test_fp8_packages_are_imported_only_when_fp8_is_asked_for():
    import subprocess
    import sys

    code = ("import sys, danube.lit.pretrain, danube.tasks.train, danube.precision; "
            "print(sorted(m for m in ('torchao', 'transformer_engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
