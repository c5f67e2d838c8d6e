import itertools

import numpy as np
import pytest
import torch

from danube.corpus.prepare import prepare
from danube.data.prepare import read_manifest
from danube.data.pretrain import PretrainDataModule
from danube.data.tokenizer import Tokenizer
from tests.data.conftest import make_docs, read_stream, write_jsonl

SEQ = 16


def _streams(two_sources):
    return {name: read_stream(d / "train").astype(np.uint16).tobytes() for name, d in two_sources.items()}


def _found_in(block: torch.Tensor, stream: bytes) -> bool:
    needle = block.numpy().astype(np.uint16).tobytes()
    pos = stream.find(needle)
    while pos >= 0 and pos % 2:
        pos = stream.find(needle, pos + 1)
    return pos >= 0


def test_batches_are_blocks_of_their_labelled_source(two_sources):
    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.source_names == ["a", "b"] and dm.tokens_per_batch == 4 * SEQ
    streams = _streams(two_sources)
    for batch in itertools.islice(dm.train_dataloader(), 20):
        assert batch["tokens"].shape == (4, SEQ + 1) and batch["tokens"].dtype == torch.long
        assert batch["source"].shape == (4,) and batch["source"].dtype == torch.long
        for block, src in zip(batch["tokens"], batch["source"]):
            name = dm.source_names[src]
            assert _found_in(block, streams[name]), f"block labelled {name} is not from {name}"


def test_batches_hold_the_tokens_of_the_walk_s_ranges(two_sources):
    """The loader reads exactly the ranges the walk hands out (checked against litdata's own reader)."""
    from danube.data.order import Walk

    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=4, num_workers=0, steps=30, seed=9)
    batches = list(dm.train_dataloader())
    assert len(batches) == 30
    walk = Walk(dm.layouts(), seed=9)
    walk.set_weights(dm.weights)
    streams = {n: read_stream(d / "train") for n, d in two_sources.items()}
    for batch in batches:
        for sample, row, src in zip(walk.batch(4, SEQ + 1), batch["tokens"], batch["source"]):
            assert int(src) == sample.source
            want = np.concatenate([streams[dm.source_names[sample.source]][a: a + n] for a, n in sample.ranges])
            np.testing.assert_array_equal(row.numpy(), want)


class _Trainer:
    """What the datamodule asks of a trainer: its rank, world size and step."""

    def __init__(self, rank: int, world: int, step: int = 0) -> None:
        self.global_rank, self.world_size, self.global_step = rank, world, step


@pytest.mark.parametrize("num_workers", [0, 2])
def test_any_number_of_ranks_trains_the_same_samples_at_each_step(two_sources, num_workers):
    """Micro-batch m of a step goes to rank m % world: the steps are the same on 1, 2 or 4 ranks."""
    steps, global_batch = 6, 8

    def per_step(world, micro):
        out = [[] for _ in range(steps)]
        for rank in range(world):
            dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=micro, global_batch_size=global_batch,
                                    steps=steps, num_workers=num_workers, seed=4, world_size=world)
            dm.trainer = _Trainer(rank, world)
            batches = list(dm.train_dataloader())
            accumulate = global_batch // (micro * world)
            assert len(batches) == steps * accumulate
            for i, b in enumerate(batches):
                out[i // accumulate] += [tuple(r.tolist()) for r in b["tokens"]]
        return [sorted(rows) for rows in out]

    one = per_step(1, 2)
    assert per_step(2, 2) == one and per_step(4, 1) == one and per_step(1, 8) == one

def test_mixture_weights_are_honoured(two_sources):
    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=4, num_workers=0, weights={"a": 3, "b": 1})
    dm.setup("fit")
    assert dm.weights == {"a": 0.75, "b": 0.25}
    sources = torch.cat([b["source"] for b in itertools.islice(dm.train_dataloader(), 300)])
    assert len(sources) == 1200
    assert abs((sources == 0).float().mean().item() - 0.75) < 0.04


def test_a_mixture_that_does_not_name_the_sources_is_refused_at_construction(two_sources):
    """The same check train.py makes before any data is read (danube.schedule.check_mixture)."""
    with pytest.raises(ValueError, match=r"mixture weights name \['a', 'c'\] but the data sources are \['a', 'b'\]: "
                                         r"unknown: \['c'\], missing: \['b'\]"):
        PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=4, weights={"a": 1, "c": 1})
    with pytest.raises(ValueError, match="mixture weights: weights must map source names to numbers >= 0"):
        PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=4, weights={"a": 1, "b": -1})


def test_default_weights_follow_manifest_tokens(two_sources):
    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=2, num_workers=0)
    dm.setup("fit")
    tokens = {n: read_manifest(d)["totals"]["train"]["tokens"] for n, d in two_sources.items()}
    assert dm.weights == pytest.approx({n: t / sum(tokens.values()) for n, t in tokens.items()})


def _take(loader, n):
    return [dict(b) for b in itertools.islice(loader, n)]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("mixture", [True, False])
def test_resume_continues_at_the_exact_next_batch(two_sources, num_workers, mixture):
    sources = two_sources if mixture else {"a": two_sources["a"]}
    kwargs = dict(seq_len=SEQ, micro_batch_size=3, num_workers=num_workers, seed=7, steps=12)
    full = _take(PretrainDataModule(sources, **kwargs).train_dataloader(), 12)

    first = PretrainDataModule(sources, **kwargs)
    loader = first.train_dataloader()
    head = _take(loader, 5)
    state = first.state_at(5)
    del loader

    second = PretrainDataModule(sources, **kwargs)
    second.load_state_dict(state)
    tail = _take(second.train_dataloader(), 7)
    assert len(tail) == 7
    for got, want in zip(head + tail, full):
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["source"], want["source"])


def test_a_checkpoint_of_the_old_order_is_refused_unless_asked_for(two_sources):
    from danube.data.pretrain import OldOrder

    old = {"train_loader": {"epoch": 1, "samples": 12, "loaders": []}}
    with pytest.raises(OldOrder, match="data.resume_old_order=true"):
        PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=2).load_state_dict(old)
    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=2, steps=4, num_workers=0,
                            resume_old_order=True)
    dm.load_state_dict(old)
    assert len(list(dm.train_dataloader())) == 4  # the new walk from every source's start


def test_val_loader_is_fixed_and_bounded(two_sources):
    dm = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=2, num_workers=0, val_batches=5)
    dm.setup("fit")
    loader = dm.val_dataloader()
    first, again = list(loader), list(loader)
    assert len(first) == 5 == len(loader)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(first, again))
    val = {n: read_stream(d / "val").astype(np.uint16).tobytes() for n, d in two_sources.items()}
    for batch in first:
        for block, src in zip(batch["tokens"], batch["source"]):
            assert _found_in(block, val[dm.source_names[src]])
    unbounded = PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=2, num_workers=0, val_batches=None)
    assert len(list(unbounded.val_dataloader())) > 5


def test_setup_errors_name_the_directory(two_sources, tmp_path, sp_model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PretrainDataModule({"x": str(tmp_path / "nowhere")}, seq_len=SEQ, micro_batch_size=1).setup("fit")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"plain is not a prepared dataset"):
        PretrainDataModule(str(tmp_path / "plain"), seq_len=SEQ, micro_batch_size=1).setup("fit")
    with pytest.raises(ValueError, match=rf"'a' \({two_sources['a']}\): \d+ training tokens, fewer than one 100001-token sample"):
        PretrainDataModule(two_sources, seq_len=100_000, micro_batch_size=1).setup("fit")
    with pytest.raises(ValueError, match="missing: \\['b'\\]"):
        PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=1, weights={"a": 1.0})
    other = "0" * 64
    with pytest.raises(ValueError, match=other):
        PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=1, tokenizer_checksum=other).setup("fit")
    good = Tokenizer(sp_model).checksum
    PretrainDataModule(two_sources, seq_len=SEQ, micro_batch_size=1, tokenizer_checksum=good).setup("fit")


def test_list_sources_get_names_and_empty_val_is_skipped(two_sources, tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(50))
    prepare([src], tmp_path / "a", sp_model, val_fraction=0.0, num_workers=1)
    dm = PretrainDataModule([str(two_sources["a"]), str(tmp_path / "a")], seq_len=SEQ, micro_batch_size=2,
                            num_workers=0)
    dm.setup("fit")
    assert dm.source_names == ["a", "a_1"]
    # only the first source has a val split: every val block comes from it
    assert {int(s) for b in dm.val_dataloader() for s in b["source"]} == {0}


def _ddp_worker(rank, directory, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=2)
    try:
        dm = PretrainDataModule(directory, seq_len=SEQ, micro_batch_size=2, global_batch_size=8, steps=5,
                                num_workers=0, seed=3)
        dm.setup("fit")
        blocks = torch.stack([b["tokens"] for b in dm.train_dataloader()])
        torch.save(blocks, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_share_each_step_of_the_one_process_order(two_sources, tmp_path):
    """Two real gloo ranks (rank and world from torch.distributed): together, each step is the 1-process step."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(str(two_sources["a"]), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0.shape == r1.shape == (5 * 2, 2, SEQ + 1)  # 5 steps of 2 micro-batches of 2 on each rank
    alone = PretrainDataModule(str(two_sources["a"]), seq_len=SEQ, micro_batch_size=8, global_batch_size=8, steps=5,
                               num_workers=0, seed=3)
    for step, want in enumerate(alone.train_dataloader()):
        got = torch.cat([r0[2 * step], r1[2 * step], r0[2 * step + 1], r1[2 * step + 1]])
        assert torch.equal(got, want["tokens"])


class _Recorder:
    """A LightningModule that only records the batches it is given (built lazily: lightning import)."""

    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen = []

            def training_step(self, batch, batch_idx):
                self.seen.append((batch["tokens"].clone(), batch["source"].clone()))
                return self.w.sum() * batch["tokens"].float().mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Recorder()


def _fit(dm, tmp_path, ckpt_path=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = _Recorder.make()
    trainer = L.Trainer(
        max_steps=8, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mixture", [True, False])
def test_lightning_resume_from_checkpoint_continues_at_the_next_batch(two_sources, tmp_path, num_workers, mixture):
    sources = two_sources if mixture else {"a": two_sources["a"]}
    kwargs = dict(seq_len=SEQ, micro_batch_size=3, num_workers=num_workers, seed=11, steps=8)
    full = _fit(PretrainDataModule(sources, **kwargs), tmp_path / "full")
    assert len(full) == 8
    ckpt = tmp_path / "full" / "epoch=0-step=4.ckpt"
    assert ckpt.is_file()
    resumed = _fit(PretrainDataModule(sources, **kwargs), tmp_path / "resumed", ckpt_path=ckpt)
    assert len(resumed) == 4
    for (tokens, source), (want_tokens, want_source) in zip(resumed, full[4:]):
        assert torch.equal(tokens, want_tokens) and torch.equal(source, want_source)


def test_shards_of_the_mistral_tokenizer_are_refused_for_a_llama2_style_model(tmp_path, mistral_model, llama2_style_model):
    """H2O-Danube2's mistake to avoid: data tokenized for one of the two dummy-prefix tokenizers, trained with the other."""
    from danube.data.prepare import check_tokenizer

    src = write_jsonl(tmp_path / "in.jsonl", make_docs(300))
    prepare([src], tmp_path / "mistral", mistral_model, val_fraction=0.1, num_workers=1)
    mistral, llama2 = Tokenizer(mistral_model), Tokenizer(llama2_style_model)
    assert read_manifest(tmp_path / "mistral")["tokenizer"]["checksum"] == mistral.checksum
    with pytest.raises(ValueError, match=llama2.checksum) as err:
        check_tokenizer(tmp_path / "mistral", llama2.checksum)
    assert mistral.checksum in str(err.value) and "danube prepare" in str(err.value)
    with pytest.raises(ValueError, match=mistral.checksum):
        PretrainDataModule(str(tmp_path / "mistral"), seq_len=SEQ, micro_batch_size=1,
                           tokenizer_checksum=llama2.checksum).setup("fit")
    PretrainDataModule(str(tmp_path / "mistral"), seq_len=SEQ, micro_batch_size=1,
                       tokenizer_checksum=mistral.checksum).setup("fit")


def test_a_stage_that_reads_a_source_more_than_once_over_says_so(two_sources, caplog):
    dm = PretrainDataModule({"b": two_sources["b"]}, seq_len=SEQ, micro_batch_size=64, steps=400, num_workers=0)
    with caplog.at_level("WARNING", logger="danube.data.pretrain"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 400
    assert "data source 'b' holds" in caplog.text and "epochs, every token read again each epoch" in caplog.text
