"""The pretraining step's loss and optimizer: the fast paths compute what the plain ones do."""

import pytest
import torch
import torch.nn.functional as F

from danube.lit.pretrain import PretrainModule, chunked_cross_entropy


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


@pytest.fixture
def tiny_module_args():
    model = dict(vocab_size=97, n_embd=32, intermediate_size=48, n_layer=2, n_head=4, n_kv_head=2,
                 sliding_window=5, max_seq_len=64)
    optim = dict(lr=1e-2, min_lr=1e-3, warmup_tokens=1000, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1,
                 grad_clip=1.0, fused="auto")
    return dict(model=model, optim=optim, total_tokens=100_000, seq_len=16)
