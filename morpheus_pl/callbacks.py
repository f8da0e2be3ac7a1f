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
    ``last.ckpt`` after every validation (or training epoch, when there is no
    validation) that did not already write it. Everything else is ``ModelCheckpoint``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer, at_train_epoch_end: bool) -> None:
        if not self.save_last or self._should_save_on_train_epoch_end(trainer) != at_train_epoch_end:
            return
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, at_train_epoch_end=True)
