"""Command-line interface: LightningCLI with the argument links of the project."""

from __future__ import annotations

import logging
import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from morpheus_pl.errors import InputError


class MorpheusCLI(LightningCLI):
    """LightningCLI whose models receive data-derived sizes through links.

    ``data.feature_dim`` becomes ``model.init_args.patch_dim`` and
    ``data.modality_specs`` becomes ``model.init_args.modalities`` once the DataModule
    is built, so configs never repeat sizes that the data determine. A
    ``ModelCheckpoint`` (with ``last.ckpt``) is always configured under ``checkpoint``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "epoch{epoch:03d}-val_loss{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.feature_dim", "model.init_args.patch_dim", apply_on="instantiate")
        parser.link_arguments(
            "data.modality_specs", "model.init_args.modalities", apply_on="instantiate"
        )


def main(args: list[str] | None = None) -> None:
    """Run the CLI; invalid input ends with its message and exit status 2."""
    # LightningCLI 2.6 calls jsonargparse APIs that warn about deprecation on every run.
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        MorpheusCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,
        )
    except InputError as error:
        logging.getLogger("morpheus_pl").error("%s", error)
        sys.exit(2)
