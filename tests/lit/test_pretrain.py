"""The pretraining step's loss and optimizer: the fast paths compute what the plain ones do."""

import pytest
import torch
import torch.nn.functional as F

from danube.lit.pretrain import PretrainModule
from danube.losses import chunked_cross_entropy


def plain_loss(hidden, weight, targets):
    logits = F.linear(hidden, weight).flatten(0, 1).float()
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-100)


def batch(dtype=torch.float64, b=3, t=11, c=16, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, c, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, c, generator=g, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, :4] = -100  # prompt-like positions without a target
    targets[2, -1] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, scale=1.0):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 33, 4096])
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk):
    hidden, weight, targets = batch()
    ref = loss_and_grads(plain_loss, hidden, weight, targets, scale=2.5)
    got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk), hidden, weight, targets, scale=2.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # softmax in fp32 on both sides


def test_chunked_loss_without_gradients_is_the_same_number():
    hidden, weight, targets = batch()
    with torch.no_grad():
        got = chunked_cross_entropy(hidden, weight, targets, 5)
    torch.testing.assert_close(got, plain_loss(hidden, weight, targets).detach())


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets = batch()
    targets.fill_(-100)
    loss, gh, gw = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 4), hidden, weight, targets)
    assert loss.item() == 0.0 and not gh.any() and not gw.any()


def test_chunked_loss_under_bf16_autocast_matches_autocast_linear():
    hidden, weight, targets = batch(dtype=torch.float32, t=40, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(plain_loss, hidden, weight, targets)
        got = loss_and_grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 16), hidden, weight, targets)
    assert got[2].dtype == torch.float32  # the parameter's gradient is in the parameter's dtype
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_optimizer_is_fused_on_cpu_and_steps_like_the_default_adamw(tiny_module_args):
    module = PretrainModule(**tiny_module_args)
    module.configure_model()
    module.tokens_seen = 10_000  # past warm-up start: a non-zero LR
    opt = module.configure_optimizers()
    assert all(g["fused"] for g in opt.param_groups)
    reference = PretrainModule(**{**tiny_module_args, "optim": {**tiny_module_args["optim"], "fused": False}})
    reference.configure_model()
    reference.model.load_state_dict(module.model.state_dict())
    reference.tokens_seen = module.tokens_seen
    ref_opt = reference.configure_optimizers()
    assert not any(g["fused"] for g in ref_opt.param_groups)
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    for m, o in ((module, opt), (reference, ref_opt)):
        for _ in range(2):
            m.loss(tokens).backward()
            m.on_before_optimizer_step(o)
            o.step()
            o.zero_grad()
    for (name, a), b in zip(module.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _fit_one_step(module, tokens, precision, clip):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=1, gradient_clip_val=clip,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    loader = torch.utils.data.DataLoader([{"tokens": row} for row in tokens], batch_size=len(tokens))
    trainer.fit(module, train_dataloaders=loader)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("fused", ["auto", False])
def test_lightning_step_clips_the_gradients_with_any_adamw(tiny_module_args, precision, fused):
    """bf16-mixed + fused AdamW + clipping was refused by Lightning's plugin; danube clips itself."""
    clip = 1e-3  # far below the gradient norm: clipping decides the update
    args = {**tiny_module_args, "optim": {**tiny_module_args["optim"], "fused": fused, "grad_clip": clip}}
    tokens = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    module = PretrainModule(**args)
    module.configure_model()
    reference = PretrainModule(**args)
    reference.configure_model()
    reference.model.load_state_dict(module.model.state_dict())

    _fit_one_step(module, tokens, precision, clip)
    assert module._grad_norm is not None and float(module._grad_norm) > 100 * clip
    opt = reference.configure_optimizers()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = reference.loss(tokens)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.model.parameters(), clip)
    reference.tokens_seen = module.tokens_seen
    reference.on_before_optimizer_step(opt)
    opt.step()
    torch.testing.assert_close(module._grad_norm, norm, rtol=1e-4, atol=0)
    for (name, a), b in zip(module.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_weight_decay_is_on_matrices_and_never_on_norms(tiny_module_args):
    module = PretrainModule(**tiny_module_args)
    module.configure_model()
    decay, no_decay = module.configure_optimizers().param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in module.model.named_parameters() if "norm" in n}
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2 + 7 * 2  # embed, lm_head, 7/block


@pytest.fixture
def tiny_module_args():
    model = dict(vocab_size=97, n_embd=32, intermediate_size=48, n_layer=2, n_head=4, n_kv_head=2,
                 sliding_window=5, max_seq_len=64)
    optim = dict(lr=1e-2, min_lr=1e-3, warmup_tokens=1000, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1,
                 grad_clip=1.0, fused="auto")
    return dict(model=model, optim=optim, total_tokens=100_000, seq_len=16)


def _fit(tmp_path, module_args, max_steps, accumulate=1, version="s1", **extra):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    module = PretrainModule(**{**module_args, **extra})
    g = torch.Generator().manual_seed(0)
    data = [{"tokens": torch.randint(0, 97, (2, 17), generator=g)} for _ in range(max_steps * accumulate)]
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        logger=TensorBoardLogger(str(tmp_path / "tensorboard"), name="", version=version,
                                                 default_hp_metric=False),
                        default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module


def test_a_stage_shorter_than_the_logging_interval_logs_its_start_first_and_last_step(tmp_path, tiny_module_args):
    from danube.plot import read_scalars

    module = _fit(tmp_path, tiny_module_args, max_steps=3, accumulate=2, log_every_n_steps=10)
    per_step = 2 * 2 * 16  # two micro-batches of 2 x 16 predicted tokens
    assert module.tokens_seen == 3 * per_step
    scalars = read_scalars(tmp_path)
    assert [x for x, _ in scalars["train/loss"]] == [per_step, 3 * per_step]  # step 1 and the last step
    # the sequence length from the stage's first token (where a stage boundary is drawn) to its last
    assert scalars["train/seq_len"] == [(0, 16.0), (per_step, 16.0), (3 * per_step, 16.0)]
    assert [x for x, _ in scalars["train/lr"]] == [0, per_step, 3 * per_step]


def test_mfu_above_the_ceiling_is_logged_as_measured_and_said_once(tmp_path, tiny_module_args, caplog):
    import logging

    from danube.plot import read_scalars

    with caplog.at_level(logging.WARNING, logger="danube.lit.pretrain"):
        _fit(tmp_path, tiny_module_args, max_steps=6, log_every_n_steps=1, peak_flops=1.0)  # 1 FLOP/s: exceeded
    warnings = [r.getMessage() for r in caplog.records if "perf/mfu" in r.getMessage()]
    assert len(warnings) == 1 and "perf.peak_flops" in warnings[0]
    assert all(v > 1 for _, v in read_scalars(tmp_path)["perf/mfu"])


def test_measured_cpu_ceiling_is_measured_once_per_shape():
    from danube.tasks.trainer import measured_matmul_flops

    first = measured_matmul_flops(64, 96)
    assert 0 < first < float("inf")
    assert measured_matmul_flops(64, 96) == first  # cached: every stage of a run uses the same ceiling
    assert measured_matmul_flops.cache_info().hits >= 1
