"""Lightning callbacks shared by the tasks."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Counts optimizer steps towards the run's ``max_steps``: ``seq256 (seq 256): 12/40``.

    Lightning's bar counts the loader's batches of one epoch: under gradient accumulation
    those are micro-batches, measured against a total that is neither the micro-batches
    nor the steps of the run (fine-tuning showed ``128/16``, full after an eighth of it),
    and a streaming loader has no length at all. Both tasks plan in optimizer steps
    (``max_steps``), so the bar does too; a resumed run starts at its step.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return super().total_train_batches

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.initial = trainer.global_step  # a resumed run's rate counts only the steps it makes
        bar.n = trainer.global_step
        bar.set_description(self.description)  # not "Epoch 0": a run here is steps, not epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return  # a micro-batch inside an accumulation: no step made
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
