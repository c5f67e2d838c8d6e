"""The progress bar counts optimizer steps against the run's steps, whatever the accumulation."""

import lightning as L
import torch

from danube.callbacks import StageProgressBar


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recording(StageProgressBar):
    def __init__(self, description):
        super().__init__(description)
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.seen.append((self.train_progress_bar.n, self.train_progress_bar.total))


def test_bar_total_is_the_optimizer_steps_under_accumulation(tmp_path):
    bar = _Recording("sft steps")
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=4, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=2)  # 32 micro-batches: more than the run
    trainer.fit(_Tiny(), loader)
    assert trainer.global_step == 5
    assert {total for _, total in bar.seen} == {5}
    assert [n for n, _ in bar.seen] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert bar.train_progress_bar.desc.startswith("sft steps")


def test_a_collective_that_fails_after_a_second_ctrl_c_is_that_stop(monkeypatch):
    """Ending the other ranks can fail this one in gloo ("Connection closed by peer") before the stop is raised.

    Seen in CI with two processes: exit 1 and a traceback instead of exit 130 and its one line.
    """
    import signal
    from pathlib import Path

    import pytest

    from danube import callbacks, entry

    def collective_fails(cfg):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33167")

    with pytest.raises(RuntimeError, match="Connection closed"):  # no stop asked for: the error as it is
        entry._stop_as_asked(collective_fails, None)
    stop = callbacks.Interrupted(signal.SIGINT, 3, Path("ck/step00000003.ckpt"), at_once=True)
    monkeypatch.setattr(callbacks, "_AT_ONCE", stop)
    with pytest.raises(callbacks.Interrupted) as raised:
        entry._stop_as_asked(collective_fails, None)
    assert raised.value is stop and raised.value.exit_code == 130
    assert str(stop) == "stopped at once by a second SIGINT; the next run resumes from ck/step00000003.ckpt (step 3)"
