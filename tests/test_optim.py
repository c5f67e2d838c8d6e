"""The one AdamW (danube.optim.adamw) and fine-tuning's LR, step by step, against the closed form."""

import math

import lightning as L
import pytest
import torch

from danube.lit.sft import SFTModule
from danube.model import DanubeConfig, build_model
from danube.optim import adamw

TINY = DanubeConfig(vocab_size=97, n_embd=32, intermediate_size=48, n_layer=2, n_head=4, n_kv_head=2,
                    sliding_window=8, max_seq_len=64)
KW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def group_names(model, opt) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in opt.param_groups]


def test_norms_are_undecayed_everything_else_decayed_fused_on_cpu():
    model = build_model(TINY)
    opt = adamw(model, **KW)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {n for n, _ in model.named_parameters()}
    norms = {n for n in names if "norm" in n}
    assert len(norms) == 2 * TINY.n_layer + 1  # two per block and the final one
    assert group_names(model, opt) == [names - norms, norms]
    assert all(g["fused"] for g in opt.param_groups)  # "auto" on CPU
    assert not any(g["fused"] for g in adamw(model, **KW, fused=False).param_groups)


def test_norms_are_found_by_module_so_flat_fsdp_views_group_alike():
    """Under FSDP1 (use_orig_params) every parameter is 1-D: grouping by p.ndim would decay nothing."""
    model = build_model(TINY)
    expected = group_names(model, adamw(model, **KW))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().flatten()))
    assert all(p.ndim == 1 for p in model.parameters())
    assert group_names(model, adamw(model, **KW)) == expected


def test_a_saved_optimizer_state_is_named_through_its_groups_not_the_module_order():
    """DDP numbers parameters group by group (decayed, then norms), not in module order: FSDP's loader
    (danube.lit.sharded) names each saved moment after the parameter it belongs to."""
    from danube.lit.sharded import named_by_group

    model = build_model(TINY)
    opt = adamw(model, **KW)
    model(torch.randint(0, 97, (2, 8))).sum().backward()
    opt.step()
    named = named_by_group(opt.state_dict(), model, opt)
    params = dict(model.named_parameters())
    assert list(named["state"]) != list(params)  # the groups' order is another order
    for name, state in named["state"].items():
        assert state["exp_avg"].shape == params[name].shape
        assert torch.equal(state["exp_avg"], opt.state[params[name]]["exp_avg"])
    assert [set(g["params"]) for g in named["param_groups"]] == group_names(model, opt)
    other = torch.optim.AdamW(model.parameters())  # one group
    with pytest.raises(ValueError, match="parameter groups of .* tensors, this model's .*: it is not a checkpoint"):
        named_by_group(opt.state_dict(), model, other)


def test_frozen_parameters_are_left_out_and_an_empty_no_decay_group_too():
    model = build_model(TINY)
    for n, p in model.named_parameters():
        p.requires_grad_("norm" not in n and "embed" not in n)
    opt = adamw(model, **KW)
    assert len(opt.param_groups) == 1
    [decay] = group_names(model, opt)
    assert decay == {n for n, p in model.named_parameters() if p.requires_grad} and not any("norm" in n for n in decay)


def test_lora_adapters_are_decayed_and_the_frozen_base_left_out():
    pytest.importorskip("peft")
    from danube.lora import add_lora

    model = add_lora(build_model(TINY))
    opt = adamw(model, **KW)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    [decay] = group_names(model, opt)
    assert decay and all("lora_A" in n or "lora_B" in n for n in decay)
    assert decay == {n for n, p in model.named_parameters() if p.requires_grad}


def expected_lr(k: int, *, lr: float, floor: float, warmup: int, total: int) -> float:
    """The closed form at step k (0-based): progress k + 1, linear warm-up, cosine to the floor."""
    p = k + 1
    if p < warmup:
        return lr * p / warmup
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * (p - warmup) / (total - warmup)))


def test_finetuning_steps_use_the_closed_form_lr_from_warmup_to_the_floor():
    """10 steps of 2 accumulated micro-batches; warm-up round(0.2 x 10) = 2 steps, floor lr x 0.1."""
    steps, accumulate, lr = 10, 2, 1e-2
    optim = dict(lr=lr, min_lr_ratio=0.1, warmup_ratio=0.2, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1)
    torch.manual_seed(0)
    module = SFTModule(build_model(TINY), optim, total_steps=steps)
    used = []

    class RecordLR(L.Callback):
        def on_train_start(self, trainer, pl_module):
            # Right after optimizer.step: the LR its update was made with. (Not a pre-hook:
            # Lightning runs the step's forward, backward and on_before_optimizer_step in the
            # closure that step() calls, after the pre-hooks.)
            trainer.optimizers[0].register_step_post_hook(lambda opt, args, kwargs: used.append(
                [g["lr"] for g in opt.param_groups]))

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 97, (2, 12), generator=g) for _ in range(steps * accumulate)]
    data = [{"input_ids": x, "labels": x, "step_loss_tokens": torch.tensor(2 * 2 * 11)} for x in ids]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[RecordLR()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))

    assert len(used) == steps and all(len(set(lrs)) == 1 for lrs in used)  # one LR per step, every group
    used = [lrs[0] for lrs in used]
    assert used[:2] == pytest.approx([lr / 2, lr])  # warm-up: half the peak at step 0, the peak at step 1
    assert used[-1] == pytest.approx(lr * 0.1)  # the last step uses exactly the floor
    assert used == pytest.approx([expected_lr(k, lr=lr, floor=lr * 0.1, warmup=2, total=steps) for k in range(steps)])
    assert all(a > b for a, b in zip(used[1:], used[2:]))
