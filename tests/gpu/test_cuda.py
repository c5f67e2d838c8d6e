"""The CUDA path on the tiny model: steps, kernels, compile, checkpointing, FP8, train.py end to end.

Skipped without CUDA (tests/conftest.py); run with ``pytest -m gpu tests/gpu tests/model/test_attention.py``
(``bench/gpu_check.sh`` does, on one H100/H200). The references are the CPU in fp32:
bf16 on CUDA must agree with them within bf16's precision, stated at each assertion.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from danube.lit.pretrain import PretrainModule
from danube.model import DanubeConfig, build_model
from danube.model.generate import SamplingParams, generate
from danube.precision import fp8_modules
from tests.conftest import CONF, REPO
from tests.train.conftest import data_root  # noqa: F401 (a fixture: the embedded sample, built once)

pytestmark = pytest.mark.gpu

BACKENDS = ["sdpa", "flex"] + (["flash"] if importlib.util.find_spec("flash_attn") else [])
FP8_BACKENDS = [b for b, package in (("torchao", "torchao"), ("te", "transformer_engine"))
                if importlib.util.find_spec(package)]
BF16 = {"trainer_precision": "bf16-mixed", "fp8": False}
FP32 = {"trainer_precision": "32-true", "fp8": False}


def tiny(**overrides) -> DanubeConfig:
    """conf/model/tiny.yaml: 4 layers x 256, window 64."""
    return DanubeConfig.from_dict({**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny.yaml")), **overrides})


def module(cfg: DanubeConfig, device: str, precision: dict = FP32, **kwargs) -> PretrainModule:
    optim = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "adamw.yaml"))
    optim.update(lr=1e-3, warmup_tokens=1)  # the peak LR from the first step
    m = PretrainModule(model=cfg.to_dict(), optim=optim, total_tokens=10**9, seq_len=256,
                       precision=precision, **kwargs).to(device)
    m.configure_model()
    return m


def batch(cfg: DanubeConfig, b: int = 4, t: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(seed))


def step(m: PretrainModule, tokens: torch.Tensor, bf16: bool) -> dict:
    """One training step as Lightning runs it: loss, clip, token-keyed LR, AdamW; then the loss again."""
    device = next(m.parameters()).device
    tokens = tokens.to(device)
    opt = m.configure_optimizers()
    before = {n: p.detach().float().cpu().clone() for n, p in m.model.named_parameters()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = m.loss(tokens)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None  # forward and backward
    grads = {n: p.grad.float().cpu().clone() for n, p in m.model.named_parameters()}
    norm = m.clip_grad_norm_(1.0)
    m.tokens_seen += tokens.numel()
    m.on_before_optimizer_step(opt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        after = m.loss(tokens)
    update = {n: p.detach().float().cpu() - before[n] for n, p in m.model.named_parameters()}
    return dict(loss=loss.item(), after=after.item(), norm=float(norm), grads=grads, update=update,
                fused=all(g["fused"] for g in opt.param_groups), peak=peak)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_steps_agree(got: dict, ref: dict, grad_tol: float) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], rel=5e-3)
    assert got["after"] == pytest.approx(ref["after"], rel=5e-3)
    assert got["norm"] == pytest.approx(ref["norm"], rel=grad_tol)
    for name, g in ref["grads"].items():
        assert relative(got["grads"][name], g) < grad_tol, name
    # AdamW's first update is ~lr x sign(grad): entries whose gradient is near zero may flip.
    same = sum((got["update"][n].sign() == u.sign()).sum().item() for n, u in ref["update"].items())
    assert same / sum(u.numel() for u in ref["update"].values()) > 0.97


@pytest.fixture(scope="module")
def cpu_step():
    """The reference: the CPU step in fp32, T = 256 with a 64-key window (the window binds)."""
    cfg = tiny(attn_backend="sdpa")
    torch.manual_seed(0)
    m = module(cfg, "cpu")
    state = {k: v.clone() for k, v in m.model.state_dict().items()}
    return cfg, state, step(m, batch(cfg), bf16=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_cuda_step_matches_the_cpu_fp32_step(cpu_step, backend):
    cfg, state, ref = cpu_step
    m = module(tiny(attn_backend=backend), "cuda", BF16)
    m.model.load_state_dict(state)
    got = step(m, batch(cfg), bf16=True)
    assert got["fused"]  # optim.fused: auto picks the fused kernel on CUDA, clipping and all
    assert_steps_agree(got, ref, grad_tol=0.05)  # bf16 keeps ~3 significant digits; 4 layers compound them


@pytest.mark.parametrize("backend", BACKENDS)
def test_windowed_attention_far_beyond_the_window(backend):
    """T = 1,024, window 64: sixteen windows long; bf16 logits against the CPU in fp32."""
    cfg = tiny(attn_backend=backend)
    torch.manual_seed(0)
    ref = build_model(tiny(attn_backend="sdpa"))
    tokens = batch(cfg, b=2, t=1024)[:, :-1]
    with torch.no_grad():
        expected = ref(tokens)
        gpu = build_model(cfg, device="cuda")
        gpu.load_state_dict(ref.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu(tokens.cuda()).float().cpu()
        unwindowed = build_model(tiny(attn_backend="sdpa", sliding_window=None))
        unwindowed.load_state_dict(ref.state_dict())
        far = unwindowed(tokens)
    assert relative(got, expected) < 2e-2
    assert relative(far[:, 64:], expected[:, 64:]) > 5 * relative(got, expected)  # the window matters here


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_segments_equal_each_sample_alone(backend):
    """Three samples packed in one row of 300, positions restarting: each equals its own forward pass."""
    cfg = tiny(attn_backend=backend)
    torch.manual_seed(0)
    ref = build_model(tiny(attn_backend="sdpa"))
    lengths = [120, 37, 143]
    tokens = batch(cfg, b=1, t=sum(lengths))[:, :-1]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    gpu = build_model(cfg, device="cuda")
    gpu.load_state_dict(ref.state_dict())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = gpu(tokens.cuda(), position_ids=pos.cuda(), segment_ids=seg.cuda()).float().cpu()
    start = 0
    for n in lengths:
        with torch.no_grad():
            alone = ref(tokens[:, start:start + n])
        assert relative(packed[:, start:start + n], alone) < 2e-2, (start, n)
        start += n


def test_kv_cached_generation_equals_uncached_greedy_decoding():
    """Prompts longer than the window, left-padded in one batch; fp32 so that no near-tie flips a token."""
    torch.manual_seed(0)
    model = build_model(tiny(attn_backend="sdpa"), device="cuda").eval()  # flex would recompile at every length
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (80, 5, 150)]
    params = SamplingParams(max_new_tokens=24)
    cached = generate(model, prompts, params)
    for prompt, new in zip(prompts, cached):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(params.max_new_tokens):  # the whole sequence again for every token: no cache
                ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
        assert new == ids[len(prompt):]


@pytest.mark.slow
def test_compiled_blocks_step_like_eager_blocks():
    """train.compile=true: each block through torch.compile (Inductor, Triton) against the eager step."""
    cfg = tiny()
    torch.manual_seed(0)
    eager = module(cfg, "cuda", BF16)
    state = {k: v.clone() for k, v in eager.model.state_dict().items()}
    ref = step(eager, batch(cfg), bf16=True)
    compiled = module(cfg, "cuda", BF16, compile=True)
    compiled.model.load_state_dict(state)
    got = step(compiled, batch(cfg), bf16=True)
    assert_steps_agree(got, ref, grad_tol=0.05)  # fused kernels round bf16 intermediates differently


def test_activation_checkpointing_recomputes_the_same_step():
    cfg = tiny()
    torch.manual_seed(0)
    plain = module(cfg, "cuda", BF16)
    state = {k: v.clone() for k, v in plain.model.state_dict().items()}
    tokens = batch(cfg, b=16)  # activations well above the weights and gradients
    ref = step(plain, tokens, bf16=True)
    checkpointed = module(cfg, "cuda", BF16, activation_checkpointing=True)
    checkpointed.model.load_state_dict(state)
    got = step(checkpointed, tokens, bf16=True)
    assert_steps_agree(got, ref, grad_tol=1e-2)
    assert got["peak"] < 0.8 * ref["peak"]  # the blocks' activations are recomputed, not kept


# -- FP8 -----------------------------------------------------------------------------------
# On the sample, batch 8 x 256, peak LR 3e-3 after 5 warm-up steps, cosine to 3e-4 at step 40.
# torchao's emulated FP8 against fp32 on CPU, same recipe: the mean of the last 10 losses 0.1%
# apart, single steps at most 0.8% (6.56 after 30 steps, from 8.34). The tolerance gives ~10x.
FP8_STEPS = 40
FP8_LOSS_TOLERANCE = 0.01  # |mean fp8 loss - mean bf16 loss| / bf16, over the last 10 steps


def sample_batches(data_root: Path, n: int, b: int = 8, t: int = 256) -> list[torch.Tensor]:
    from danube.data.pretrain import PretrainDataModule

    dm = PretrainDataModule({"sample": str(data_root / "sample" / "shards")}, seq_len=t, micro_batch_size=b,
                            seed=0, num_workers=0, val_batches=1)
    out = []
    for item in dm.train_dataloader():
        out.append(item["tokens"])
        if len(out) == n:
            return out
    raise AssertionError(f"the sample has fewer than {n} batches of {b} x {t}")


def train_curve(precision: dict, batches: list[torch.Tensor], compile: bool = False) -> tuple[list[float], PretrainModule]:
    """Losses of one step per batch; the LR schedule is the FP8_STEPS one whatever the number of batches."""
    cfg = tiny()
    optim = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "adamw.yaml"))
    tokens = batches[0].numel()
    optim.update(lr=3e-3, min_lr=3e-4, warmup_tokens=5 * tokens)
    torch.manual_seed(0)
    m = PretrainModule(model=cfg.to_dict(), optim=optim, total_tokens=FP8_STEPS * tokens,
                       seq_len=batches[0].shape[1] - 1, precision=precision,
                       compile=compile).to("cuda")
    m.configure_model()
    opt = m.configure_optimizers()
    losses = []
    for x in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m.loss(x.cuda())
        loss.backward()
        m.clip_grad_norm_(1.0)
        m.tokens_seen += x.numel()
        m.on_before_optimizer_step(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, m


@pytest.fixture(scope="module")
def bf16_curve(data_root):  # noqa: F811
    batches = sample_batches(data_root, FP8_STEPS)
    return batches, train_curve(BF16, batches)[0]


@pytest.mark.skipif(not FP8_BACKENDS, reason="no FP8 backend installed (torchao or transformer-engine)")
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_fp8_trains_like_bf16_with_lm_head_in_bf16(bf16_curve, backend):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    batches, reference = bf16_curve
    losses, m = train_curve({"trainer_precision": "bf16-mixed", "fp8": True, "backend": backend}, batches)
    assert len(fp8_modules(m.model)) == 7 * m.config.n_layer
    # lm_head stays a plain nn.Linear: the chunked loss multiplies by its weight in the autocast dtype, bf16.
    assert "lm_head" not in fp8_modules(m.model) and type(m.model.lm_head) is nn.Linear
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0  # it learns
    mean = lambda v: sum(v[-10:]) / 10  # noqa: E731
    assert abs(mean(losses) - mean(reference)) / mean(reference) < FP8_LOSS_TOLERANCE, (losses, reference)


@pytest.mark.slow
@pytest.mark.skipif("torchao" not in FP8_BACKENDS, reason="torchao not installed")
def test_torchao_fp8_composes_with_compiled_blocks(bf16_curve):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    batches, reference = bf16_curve
    losses, m = train_curve({"trainer_precision": "bf16-mixed", "fp8": True, "backend": "torchao"},
                            batches[:12], compile=True)
    assert len(fp8_modules(m.model)) == 7 * m.config.n_layer
    assert all(math.isfinite(v) for v in losses)
    mean = lambda v: sum(v[6:12]) / 6  # noqa: E731 (single steps differ by up to ~1%)
    assert abs(mean(losses) - mean(reference)) / mean(reference) < 2 * FP8_LOSS_TOLERANCE, (losses, reference[:12])


# -- train.py end to end ----------------------------------------------------------------------
def train_py(tmp_path: Path, data_root: Path, *overrides: str) -> Path:  # noqa: F811
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "train.py", "debug=fast", "trainer=h100x1", *overrides, f"paths.data_dir={data_root}",
         f"run_dir={run_dir}", "data.num_workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def assert_finished_run(run_dir: Path) -> None:
    from danube.model.loading import load_model
    from danube.plot import read_scalars

    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "val/loss", "train/grad_norm", "perf/tokens_per_sec", "perf/mfu"):
        assert tag in scalars and all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]
    model = load_model(run_dir / "seq128" / "model")
    assert model.cfg.n_layer == 2 and (run_dir / "seq128" / "model" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_train_py_debug_fast_bf16_on_one_gpu(tmp_path, data_root):  # noqa: F811
    assert_finished_run(train_py(tmp_path, data_root, "precision=bf16"))


@pytest.mark.slow
@pytest.mark.skipif(not FP8_BACKENDS, reason="no FP8 backend installed (torchao or transformer-engine)")
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_train_py_debug_fast_fp8_on_one_gpu(tmp_path, data_root, backend):  # noqa: F811
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    assert_finished_run(train_py(tmp_path, data_root, "precision=fp8", f"precision.backend={backend}"))


@pytest.mark.slow
@pytest.mark.skipif("torchao" not in FP8_BACKENDS, reason="torchao not installed")
def test_train_py_fsdp_with_torchao_fp8_and_compile(tmp_path, data_root):  # noqa: F811
    """FSDP (one rank: the wrapping, the sharded clipping and state dicts all run) + float8 + compiled blocks."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    stages = "recipe.stages=[{name: seq64, seq_len: 64, tokens: 16384}, {name: seq128, seq_len: 128, tokens: 8192}]"
    run_dir = train_py(tmp_path, data_root, "trainer=h100x8_fsdp", "trainer.devices=1", "precision=fp8",
                       "precision.backend=torchao", "train.compile=true", stages)
    assert_finished_run(run_dir)

