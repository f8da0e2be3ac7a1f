"""Base LightningModule of the downstream tasks: the MORPHEUS encoder plus a head."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, Metric

from morpheus_pl import batch as keys
from morpheus_pl.checkpoints import (
    ARCHITECTURE_KEYS,
    check_compatible,
    load_encoder,
    read_checkpoint,
)
from morpheus_pl.errors import InputError
from morpheus_pl.nn import Morpheus
from morpheus_pl.optim import adamw_warmup_cosine
from morpheus_pl.pretraining import check_attention_sizes
from morpheus_pl.seeding import reseed_step

EVAL_STAGES = ("val", "test")


class DownstreamTask(pl.LightningModule):
    """Patient embedding from the MORPHEUS encoder, then a task head.

    Subclasses define the head, the loss and the metrics. ``patch_dim``,
    ``modalities`` and ``target_info`` come from the DataModule through argument
    links and are saved in the checkpoint.

    Args:
        patch_dim: Patch-feature dimension ``D`` (linked from the data).
        modalities: Modality specifications (linked from the data).
        target_info: Facts about the labels (linked from the data).
        pretrained: Pre-training checkpoint to initialise the encoder and tokenizers
            from (decoders are dropped); None trains from scratch. Its encoder settings
            replace ``width`` to ``group_embeddings`` below, and its features and
            groups must equal the data's.
        freeze_encoder: Train only the head on a frozen encoder (linear probing).
        input_modalities: Omics modalities given to the encoder besides the slide, at
            training and evaluation. None uses every modality of the data, ``[]`` the
            slide only.
        eval_modalities: Omics modalities at evaluation, a subset of
            ``input_modalities``; None uses ``input_modalities``.
        width: Token width.
        num_prototypes: Slide tokens per slide.
        depth: Encoder blocks.
        heads: Encoder attention heads.
        mlp_dim: Hidden width of the encoder MLPs.
        dropout: Dropout in the encoder and before the head.
        modality_embeddings: Learned embedding per token type.
        group_embeddings: Learned embedding per omics token.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        torch_compile: Compile the network's parts with ``torch.compile`` (see
            ``Morpheus.compile_parts``); parts that fail to compile run eagerly.
        initialised_from: Set by the module itself: the checkpoint that ``pretrained``
            named, kept in the hyper-parameters for the record.
    """

    def __init__(
        self,
        patch_dim: int,
        modalities: dict[str, dict[str, Any]],
        target_info: dict[str, Any] | None = None,
        pretrained: str | None = None,
        freeze_encoder: bool = False,
        input_modalities: list[str] | None = None,
        eval_modalities: list[str] | None = None,
        width: int = 256,
        num_prototypes: int = 16,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int = 256,
        dropout: float = 0.35,
        modality_embeddings: bool = False,
        group_embeddings: bool = False,
        lr: float = 5e-5,
        weight_decay: float = 1e-2,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        initialised_from: str | None = None,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        check_attention_sizes(encoder=(width, heads))
        if target_info is None:
            raise InputError(
                f"{type(self).__name__} needs labels: set data.targets (for example "
                "data_modules.SurvivalTargets or data_modules.ClassTargets)"
            )
        self.input_modalities = list(modalities) if input_modalities is None else list(input_modalities)
        self.eval_modalities = self.input_modalities if eval_modalities is None else list(eval_modalities)
        unknown = sorted(set(self.input_modalities) - set(modalities))
        if unknown:
            raise InputError(
                f"input_modalities {unknown} are not modalities of the data ({sorted(modalities)})"
            )
        extra = sorted(set(self.eval_modalities) - set(self.input_modalities))
        if extra:
            raise InputError(
                f"eval_modalities {extra} are not among input_modalities {self.input_modalities}"
            )
        used = {m: modalities[m] for m in self.input_modalities}

        checkpoint = None
        architecture = {k: self.hparams[k] for k in ARCHITECTURE_KEYS}
        if pretrained is not None:
            checkpoint = read_checkpoint(pretrained)
            saved = checkpoint["hyper_parameters"]
            check_compatible(saved, patch_dim, used, pretrained)
            architecture = {k: saved.get(k, architecture[k]) for k in ARCHITECTURE_KEYS}
            # Later reloads rebuild this architecture without reading the file again.
            self.hparams.update(architecture)
            self.hparams["pretrained"] = None
            self.hparams["initialised_from"] = str(pretrained)

        self.encoder = Morpheus(
            patch_dim,
            groups={m: s["groups"] for m, s in used.items()},
            n_features={m: len(s["features"]) for m, s in used.items()},
            dropout=dropout,
            decoders=False,
            **architecture,
        )
        if checkpoint is not None:
            skip = {"decoders.": "decoders are dropped"}
            skip.update(
                {f"tokenizers.{m}.": "modality not used" for m in modalities if m not in used}
            )
            report = load_encoder(self.encoder, checkpoint["state_dict"], "model.", pretrained, skip)
            self.load_report = report
            rank_zero_info(report.summary(also_new="the task head"))
        self.head_dropout = nn.Dropout(dropout)
        self.head = self.configure_head(architecture["width"], target_info)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

        self.eval_metrics = nn.ModuleDict({s: self.configure_metrics(target_info) for s in EVAL_STAGES})
        # Lightning 2.6's sync_dist mean floors the batch sizes summed over processes
        # when they hold different numbers of patients, so the evaluation loss is
        # averaged by a MeanMetric, whose sums synchronise exactly. A NaN loss stays
        # NaN rather than being dropped.
        self.eval_losses = nn.ModuleDict(
            {s: MeanMetric(nan_strategy="disable") for s in EVAL_STAGES}
        )

    @staticmethod
    def check_arguments(arguments: dict[str, Any]) -> None:
        """Check the arguments that do not depend on the data (the CLI calls this first)."""
        check_attention_sizes(encoder=(arguments.get("width", 256), arguments.get("heads", 8)))

    @abstractmethod
    def configure_head(self, width: int, target_info: dict[str, Any]) -> nn.Module:
        """Build the head that maps ``(B, width)`` embeddings to the task's outputs."""

    @abstractmethod
    def compute_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """Return the scalar training loss of the head outputs."""

    @abstractmethod
    def configure_metrics(self, target_info: dict[str, Any]) -> Metric:
        """Build the epoch metric of one evaluation stage; its ``compute`` returns a dict."""

    @abstractmethod
    def update_metrics(self, metric: Metric, outputs: torch.Tensor, batch: dict) -> None:
        """Add a batch of head outputs to the epoch metric."""

    def train(self, mode: bool = True) -> DownstreamTask:
        super().train(mode)
        if self.hparams.freeze_encoder:
            # A frozen encoder gives the same embedding every epoch: no dropout.
            self.encoder.eval()
        return self

    def embed(self, batch: dict, modalities: list[str]) -> torch.Tensor:
        """Return ``(B, width)`` patient embeddings from the slide and ``modalities``.

        All tokens of a modality the patient has are visible; a modality the patient
        lacks contributes no token.
        """
        omics = {m: batch[keys.OMICS][m] for m in modalities}
        visible = {
            m: batch[keys.OMICS_PRESENT][m][:, None].expand(-1, len(self.encoder.tokenizers[m].index.sizes))
            for m in modalities
        }
        encoded = self.encoder.encode(batch[keys.PATCHES], batch.get(keys.PATCH_MASK), omics, visible)
        return encoded.embedding

    def forward(self, batch: dict, modalities: list[str] | None = None) -> torch.Tensor:
        """Return the head outputs of a batch."""
        modalities = self.eval_modalities if modalities is None else modalities
        return self.head(self.head_dropout(self.embed(batch, modalities)))

    def configure_model(self) -> None:
        if self.hparams.get("torch_compile") and not getattr(self, "_compiled", False):
            self.encoder.compile_parts()
            self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Masks and dropout of a step depend only on the seed, the epoch and the batch,
        # so a resumed run continues exactly where the stopped one left off.
        reseed_step(self.current_epoch, batch_idx, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch, self.input_modalities)
        loss = self.compute_loss(outputs, batch)
        size = batch[keys.PATCHES].shape[0]
        self.log("train/loss", loss, batch_size=size, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        outputs = self(batch, self.eval_modalities)
        loss = self.compute_loss(outputs, batch)
        size = batch[keys.PATCHES].shape[0]
        self.eval_losses[stage].update(loss.detach().float(), size)
        self.update_metrics(self.eval_metrics[stage], outputs, batch)

    def _eval_epoch_end(self, stage: str) -> None:
        metric, loss = self.eval_metrics[stage], self.eval_losses[stage]
        # compute() gathers every process's patients, so every process logs the same
        # values, and sync_dist only stops Lightning's warning about unsynchronised
        # epoch-level values. NCCL cannot reduce the CPU tensors the metrics return,
        # so they move to the module's device first.
        self.log(f"{stage}/loss", loss.compute(), sync_dist=True)
        for name, value in metric.compute().items():
            value = value.float().to(self.device)
            self.log(f"{stage}/{name}", value, prog_bar=True, sync_dist=True)
        metric.reset()
        loss.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, hp.min_lr_ratio)
