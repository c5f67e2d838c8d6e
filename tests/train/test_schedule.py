import math

import pytest

from danube.schedule import Schedule, format_plan, lr_at, plan_stages
from tests.train.conftest import compose_train

KW = dict(lr=2e-4, min_lr=1e-5, warmup=2_359_296_000, total=10**12)


def test_warmup_then_cosine_to_min_lr():
    assert lr_at(0, **KW) == 0
    assert lr_at(1_179_648_000, **KW) == pytest.approx(1e-4)  # half-way through warm-up
    assert lr_at(2_359_296_000, **KW) == pytest.approx(2e-4)
    mid = (2_359_296_000 + 10**12) / 2
    assert lr_at(int(mid), **KW) == pytest.approx((2e-4 + 1e-5) / 2, rel=1e-6)
    assert lr_at(10**12, **KW) == pytest.approx(1e-5)
    assert lr_at(2 * 10**12, **KW) == 1e-5
    values = [lr_at(t, **KW) for t in range(2_359_296_000, 10**12, 10**10)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warm-up


def test_report_plan_on_8_gpus():
    cfg = compose_train(["model=danube_1p8b", "trainer=h100x8"])
    from omegaconf import OmegaConf

    plans = plan_stages(OmegaConf.to_container(cfg.recipe.stages), global_batch_tokens=1_179_648,
                        micro_batch_tokens=16_384, world_size=8)
    assert [p.seq_len for p in plans] == [2048, 4096, 8192, 16384]
    assert [p.micro_batch_size for p in plans] == [8, 4, 2, 1]
    assert all(p.grad_accum == 9 for p in plans)  # 8 GPUs x 16,384 tokens x 9 = 1,179,648
    assert plans[0].steps == 700_000_000_000 // 1_179_648
    assert plans[1].start_tokens == plans[0].end_tokens  # stages follow each other exactly
    schedule = Schedule(lr=2e-4, min_lr=1e-5, warmup=2_359_296_000, total=plans[-1].end_tokens)
    text = format_plan(plans, schedule=schedule, tokens_per_sec=292_700, world_size=8, global_batch_tokens=1_179_648)
    hours = plans[-1].end_tokens / 292_700 / 3600
    assert f"{hours:,.1f} h" in text and "seq16k" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_tokens=1_000_000, micro_batch_tokens=16_384, world_size=8), "not divisible"),
        (dict(global_batch_tokens=1_179_648, micro_batch_tokens=3000, world_size=8), "not a multiple of seq_len"),
        (dict(global_batch_tokens=2**40, micro_batch_tokens=16_384, world_size=8), "less than one step"),
    ],
)
def test_plan_rejects_what_cannot_divide(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_stages([{"name": "seq2k", "seq_len": 2048, "tokens": 10**12}], **kwargs)


def test_ln_of_cosine_is_symmetric():
    # the cosine is centred between the end of warm-up and the end of the last stage
    kw = dict(lr=1.0, min_lr=0.0, warmup=100, total=1100)
    assert lr_at(600, **kw) == pytest.approx(0.5)
    assert lr_at(350, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


# The one schedule in generic units (fine-tuning counts optimizer steps): lr 1, floor 0.1,
# warm-up over 4 units, the cosine ends at 20.
UNITS = dict(lr=1.0, min_lr=0.1, warmup=4, total=20)


def closed_form(p: float) -> float:
    if p < 4:
        return p / 4
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (p - 4) / 16)))


def test_warmup_is_linear_from_the_first_unit_to_the_peak():
    assert [lr_at(p, **UNITS) for p in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert lr_at(1, **UNITS) > 0  # the first step uses progress 1, never LR 0


def test_cosine_from_the_peak_through_the_midpoint_to_the_floor():
    assert lr_at(4, **UNITS) == 1.0  # the peak exactly at the end of warm-up
    assert lr_at(12, **UNITS) == pytest.approx(0.55)  # half-way: the mean of peak and floor
    assert lr_at(20, **UNITS) == pytest.approx(0.1)  # the floor exactly at `total`
    assert lr_at(25, **UNITS) == 0.1
    values = [lr_at(p, **UNITS) for p in range(4, 21)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after warm-up
    assert [lr_at(p, **UNITS) for p in range(26)] == pytest.approx([closed_form(p) for p in range(26)])


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup=0, total=10) == 1.0
    assert lr_at(10, lr=1.0, min_lr=0.0, warmup=0, total=10) == 0.0


def test_a_global_batch_the_devices_cannot_share_names_what_would_keep_it():
    from danube.schedule import plan_stages

    stage = [{"name": "s", "seq_len": 64, "tokens": 40960}]
    with pytest.raises(ValueError, match=r"to keep the global batch of 64 sequences: 2 or 4 devices in all "
                                         r"\(trainer.devices x trainer.num_nodes\) with this micro-batch$"):
        plan_stages(stage, global_batch_tokens=4096, micro_batch_tokens=1024, world_size=3)
    with pytest.raises(ValueError, match=r": 2 devices in all \(trainer.devices x trainer.num_nodes\) with this "
                                         r"micro-batch, or train.micro_batch_tokens=512 on these 8$"):
        plan_stages(stage, global_batch_tokens=4096, micro_batch_tokens=2048, world_size=8)
    assert plan_stages(stage, global_batch_tokens=4096, micro_batch_tokens=512, world_size=8)[0].grad_accum == 1
