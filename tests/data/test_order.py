"""The walk through the data (danube.data.order): one order, whatever the stages, batches and mixtures.

Counts here are per token, from the token ranges the walk hands out, independently of the
walk's own bookkeeping (which :func:`coverage` and ``danube data-report`` use).
"""

from __future__ import annotations

import numpy as np
import pytest

from danube.data.order import (Layout, OrderMismatch, Walk, coverage, digest, micro_batch_indices, plan_layout)


def _layout(tokens: int, piece: int | None = 1024, lanes: int = 16, longest: int = 33) -> Layout:
    return plan_layout(tokens, f"fp{tokens}", longest_block=longest, piece_tokens=piece, lanes=lanes)


def _count(walk: Walk, counts: dict[str, np.ndarray], steps: int, batch: int, block: int) -> list:
    out = []
    for _ in range(steps):
        samples = walk.batch(batch, block)
        out.append(samples)
        for s in samples:
            assert sum(n for _, n in s.ranges) == block
            for start, n in s.ranges:
                counts[walk.names[s.source]][start: start + n] += 1
    return out


def test_automatic_layout_scales_pieces_and_lanes_with_the_source():
    small = plan_layout(100_000, "x", longest_block=129, piece_tokens=None, lanes=512)
    assert small.piece == 4096 and small.lanes == 12  # each lane holds >= 64 of the longest samples
    big = plan_layout(10**12, "x", longest_block=16385, piece_tokens=None, lanes=512)
    assert big.piece == 1 << 20 and big.lanes == 512
    assert plan_layout(5000, "x", longest_block=4097, piece_tokens=None, lanes=512).lanes == 1


def test_a_longer_stage_reads_no_token_the_shorter_one_read_while_unread_ones_remain():
    tokens = 50_000
    walk = Walk({"a": _layout(tokens)}, seed=3)
    counts = {"a": np.zeros(tokens, dtype=np.int64)}
    _count(walk, counts, steps=24, batch=32, block=17)  # ~26k tokens: half the source at seq 16
    first = counts["a"] > 0
    _count(walk, counts, steps=6, batch=16, block=33)  # the next stage, at seq 32
    assert counts["a"].max() == 1, "a token was read twice within one epoch"
    assert (counts["a"] > 0).sum() == first.sum() + 6 * 16 * 33
    np.testing.assert_array_equal(coverage(walk.state(), "a"), np.bincount(counts["a"], minlength=2))


def test_an_epoch_reads_every_token_but_the_lanes_short_ends_then_a_new_permutation_begins(caplog):
    tokens = 20_000
    walk = Walk({"a": _layout(tokens, lanes=8)}, seed=1, announce=True)
    counts = {"a": np.zeros(tokens, dtype=np.int64)}
    block = 33
    with caplog.at_level("INFO", logger="danube.data.order"):
        batches = _count(walk, counts, steps=tokens // (8 * block) + 1, batch=8, block=block)
    state = walk.state()["sources"]["a"]
    assert state["epoch"] == 1 and len(state["finished"]) == 1
    assert state["skipped"] < 8 * block  # at most one short end per lane
    assert "data source 'a': epoch 0 read" in caplog.text and "epoch 1 begins with a new permutation" in caplog.text
    np.testing.assert_array_equal(coverage(walk.state(), "a"), np.bincount(counts["a"], minlength=3)[:3])
    first_epoch = [s.ranges for b in batches[:3] for s in b]
    again = Walk({"a": _layout(tokens, lanes=8)}, seed=1)
    for _ in range(tokens // (8 * block) + 1):
        again.batch(8, block)
    assert [s.ranges for s in again.batch(24, block)] != first_epoch  # another permutation


def test_the_order_does_not_depend_on_how_steps_are_cut_into_batches():
    layouts = {"a": _layout(40_000), "b": _layout(25_000)}
    one, other = Walk(layouts, seed=5), Walk(layouts, seed=5)
    one.set_weights({"a": 2, "b": 1})
    other.set_weights({"a": 2, "b": 1})
    big = [(s.source, s.ranges) for s in one.batch(96, 17)]
    small = [(s.source, s.ranges) for _ in range(12) for s in other.batch(8, 17)]
    assert big == small and one.state() == other.state()


def test_every_rank_trains_its_own_micro_batches_and_together_the_step():
    for world, accumulate in ((1, 8), (2, 4), (4, 2), (8, 1)):
        mine = [micro_batch_indices(r, world, accumulate) for r in range(world)]
        assert sorted(m for ms in mine for m in ms) == list(range(8))


def test_the_mixture_follows_its_weights_closely_even_over_a_short_stretch():
    walk = Walk({"a": _layout(10**6), "b": _layout(10**6)}, seed=0)
    walk.set_weights({"a": 3, "b": 1})
    picks = walk.picks(0, 400)
    assert abs(int((picks == 0).sum()) - 300) <= 2
    np.testing.assert_array_equal(walk.picks(123, 50), picks[123:173])  # a function of the sample's position


def test_a_mixture_change_keeps_every_source_where_it_was():
    layouts = {"a": _layout(30_000), "b": _layout(30_000)}
    walk = Walk(layouts, seed=2)
    walk.set_weights({"a": 1, "b": 0})
    walk.batch(40, 17)
    a_read = walk.state()["sources"]["a"]["read"]
    assert a_read == 40 * 17 and walk.state()["sources"]["b"]["read"] == 0
    walk.set_weights({"a": 0, "b": 1})  # the next stage's mixture
    walk.batch(20, 33)
    state = walk.state()["sources"]
    assert state["a"]["read"] == a_read and state["b"]["read"] == 20 * 33
    # Resumed with both again: a goes on from its cursors, never from its start.
    counts = {n: np.zeros(30_000, dtype=np.int64) for n in layouts}
    replay = Walk(layouts, seed=2)
    replay.set_weights({"a": 1, "b": 0})
    _count(replay, counts, 1, 40, 17)
    replay.set_weights({"a": 0, "b": 1})
    _count(replay, counts, 1, 20, 33)
    resumed = Walk(layouts, seed=2, state=replay.state())
    resumed.set_weights({"a": 1, "b": 1})
    _count(resumed, counts, 4, 30, 33)
    assert counts["a"].max() == 1 and counts["b"].max() == 1


def test_a_source_added_later_starts_at_its_beginning_and_a_dropped_one_keeps_its_position():
    only_a = Walk({"a": _layout(30_000)}, seed=4)
    only_a.batch(10, 17)
    both = Walk({"a": _layout(30_000), "b": _layout(20_000)}, seed=4, state=only_a.state())
    state = both.state()["sources"]
    assert state["a"]["read"] == 170 and state["b"]["read"] == 0
    both.batch(10, 17)
    without_b = Walk({"a": _layout(30_000)}, seed=4, state=both.state())
    kept = without_b.state()["sources"]["b"]
    assert kept == both.state()["sources"]["b"] and kept["read"] > 0
    back = Walk({"a": _layout(30_000), "b": _layout(20_000)}, seed=4, state=without_b.state())
    assert back.state()["sources"]["b"]["cursors"] == kept["cursors"]


def test_a_recorded_position_is_refused_for_other_data_behind_the_same_name():
    walk = Walk({"a": _layout(30_000)}, seed=4)
    walk.batch(4, 17)
    with pytest.raises(OrderMismatch, match=r"data source 'a' holds 31,000 training tokens .* the recorded walk read "
                                            r"one of 30,000"):
        Walk({"a": _layout(31_000)}, seed=4, state=walk.state())
    with pytest.raises(OrderMismatch, match="format"):
        Walk({"a": _layout(30_000)}, seed=4, state={"train_loader": {}})


def test_a_resumed_walk_keeps_the_seed_it_started_with():
    walk = Walk({"a": _layout(30_000)}, seed=4)
    walk.batch(4, 17)
    resumed = Walk({"a": _layout(30_000)}, seed=99, state=walk.state())
    straight = Walk({"a": _layout(30_000)}, seed=4)
    straight.batch(4, 17)
    assert [s.ranges for s in resumed.batch(8, 17)] == [s.ranges for s in straight.batch(8, 17)]


def test_the_step_digest_tells_equal_reads_from_different_ones():
    layouts = {"a": _layout(30_000), "b": _layout(30_000)}
    x, y = Walk(layouts, seed=1), Walk(layouts, seed=1)
    assert digest(x.batch(16, 17), x.names) == digest(y.batch(16, 17), y.names)
    z = Walk(layouts, seed=2)
    assert digest(x.batch(16, 17), x.names) != digest(z.batch(16, 17), z.names)


def test_the_mixture_stays_even_a_billion_samples_into_the_run():
    walk = Walk({"a": _layout(10**12, piece=None, lanes=512, longest=16385), "b": _layout(10**6)}, seed=0)
    walk.set_weights({"a": 1, "b": 1})
    picks = walk.picks(10**9, 1000)
    assert abs(int((picks == 0).sum()) - 500) <= 2
