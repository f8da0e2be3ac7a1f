"""Callbacks that the command line configures for every run."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` follows every epoch.

    Lightning 2.6 rewrites ``last.ckpt`` only in a step where it also saves a
    monitored checkpoint. With ``monitor`` and ``save_top_k`` set, ``last.ckpt`` would
    then stay at the best epoch, so a finished run would not contain its final weights
    and a resumed run would repeat every epoch since the best one. This callback rewrites
    ``last.ckpt`` after every validation, after every training epoch that ends without
    one, and when training ends, unless that step already wrote it. Everything else is
    ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if trainer.state.fn != TrainerFn.FITTING or self._last_written_step == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Each refresh runs after the parent's hook: a save in this step, last.ckpt included,
    # makes the parent skip its monitored checkpoint for the rest of the step.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # An epoch without validation (check_val_every_n_epoch > 1) is recorded here.
        every = trainer.check_val_every_n_epoch
        validated = trainer.enable_validation and (every is None or (trainer.current_epoch + 1) % every == 0)
        if not validated or self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)
