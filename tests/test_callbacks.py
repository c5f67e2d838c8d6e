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
