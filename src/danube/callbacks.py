"""Lightning callbacks shared by the tasks."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Counts micro-batches towards the end of the stage (streaming loaders have no epoch length)."""

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        done = trainer.global_step * trainer.accumulate_grad_batches
        self.train_progress_bar.initial = done
        self.train_progress_bar.n = done
        self.train_progress_bar.set_description(self.description)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
