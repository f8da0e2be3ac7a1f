"""Masked-omics pre-training as a LightningModule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.metrics import FeaturePearson
from morpheus_pl.nn import (
    Morpheus,
    ReconstructionOutput,
    draws_per_sample,
    masked_group_l1,
    seeded_uniform,
)
from morpheus_pl.optim import adamw_warmup_cosine
from morpheus_pl.reconstruction import predict, resolve_request
from morpheus_pl.seeding import reseed_step

EVAL_STAGES = ("val", "test")


def check_attention_sizes(**sizes: tuple[int, int]) -> None:
    """Raise unless each ``(width, heads)`` pair splits the width evenly across heads."""
    for name, (width, heads) in sizes.items():
        if heads < 1 or width % heads:
            raise InputError(
                f"{name}: width {width} is not divisible by {heads} heads; choose a number of "
                "heads that divides the width (for example 8 for width 256)"
            )


def check_modalities(modalities: dict[str, dict[str, Any]]) -> None:
    """Check the modality specifications that the DataModule links into the model."""
    if not modalities:
        raise InputError(
            "the model needs at least one omics modality; list them under data.modalities"
        )
    for name, spec in modalities.items():
        if not name.isidentifier():
            raise InputError(f"modality name {name!r} must be a Python identifier (e.g. 'rna')")
        for key in ("features", "groups"):
            if key not in spec:
                raise InputError(f"modality {name!r} has no {key!r} entry")


class MaskedOmicsPretraining(pl.LightningModule):
    """Pre-train MORPHEUS by reconstructing masked omics tokens from the slide and the rest.

    ``patch_dim`` and ``modalities`` come from the DataModule through argument links
    and are saved in the checkpoint, so ``load_from_checkpoint`` needs no data.

    Args:
        patch_dim: Patch-feature dimension ``D`` (linked from the data).
        modalities: Per modality, ``features`` (ids), ``groups`` (member indices),
            ``group_names`` and ``train_mean`` (per-feature training means, for the
            mean-prediction baseline); linked from the data.
        width: Token width of tokenizers and encoder.
        num_prototypes: Slide tokens per slide.
        depth: Encoder blocks.
        heads: Encoder attention heads.
        mlp_dim: Hidden width of the encoder MLPs.
        dropout: Dropout in encoder and decoders (AlphaDropout in the omics tokenizers).
        decoder_width: Decoder token width.
        decoder_depth: Blocks per decoder.
        decoder_heads: Decoder attention heads.
        decoder_mlp_dim: Hidden width of the decoder MLPs.
        modality_embeddings: Learned embedding per token type; off as in the reference.
        group_embeddings: Learned embedding per omics token in the encoder input.
        mask_ratio: Fraction of each patient's omics tokens masked per step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_epochs: Epochs of linear warm-up before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        torch_compile: Compile the network's parts with ``torch.compile`` (see
            ``Morpheus.compile_parts``); parts that fail to compile run eagerly.
        eval_mask_seed: Seed of the masks drawn at validation and test. Each patient's
            mask comes from this seed and the patient's cohort position, so every epoch,
            batch size and number of processes scores the same masks.
    """

    def __init__(
        self,
        patch_dim: int,
        modalities: dict[str, dict[str, Any]],
        width: int = 256,
        num_prototypes: int = 16,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int = 256,
        dropout: float = 0.15,
        decoder_width: int = 256,
        decoder_depth: int = 1,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 256,
        modality_embeddings: bool = False,
        group_embeddings: bool = False,
        mask_ratio: float = 0.75,
        lr: float = 5e-4,
        weight_decay: float = 1e-3,
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.0,
        eval_mask_seed: int = 0,
        torch_compile: bool = False,
    ) -> None:
        super().__init__()
        check_modalities(modalities)
        check_attention_sizes(encoder=(width, heads), decoder=(decoder_width, decoder_heads))
        # The feature lists can be long: keep them in the checkpoint, not in the logger.
        self.save_hyperparameters(logger=False)
        self.modality_names = list(modalities)
        self.model = Morpheus(
            patch_dim,
            groups={m: s["groups"] for m, s in modalities.items()},
            n_features={m: len(s["features"]) for m, s in modalities.items()},
            width=width,
            num_prototypes=num_prototypes,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
            decoder_width=decoder_width,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            decoder_mlp_dim=decoder_mlp_dim,
            modality_embeddings=modality_embeddings,
            group_embeddings=group_embeddings,
        )
        for m, spec in modalities.items():
            mean = spec.get("train_mean") or [0.0] * len(spec["features"])
            self.register_buffer(f"train_mean_{m}", torch.tensor(mean, dtype=torch.float32))

        self.eval_metrics = nn.ModuleDict()
        for stage in EVAL_STAGES:
            per_stage = nn.ModuleDict()
            for m, spec in modalities.items():
                per_stage[f"loss_{m}"] = MeanMetric()
                per_stage[f"baseline_loss_{m}"] = MeanMetric()
                per_stage[f"pearson_{m}"] = FeaturePearson(len(spec["features"]))
            self.eval_metrics[stage] = per_stage

    @staticmethod
    def check_arguments(arguments: dict[str, Any]) -> None:
        """Check the arguments that do not depend on the data (the CLI calls this first)."""
        defaults = {"width": 256, "heads": 8, "decoder_width": 256, "decoder_heads": 8}
        value = {k: arguments.get(k, v) for k, v in defaults.items()}
        check_attention_sizes(
            encoder=(value["width"], value["heads"]),
            decoder=(value["decoder_width"], value["decoder_heads"]),
        )

    def on_fit_start(self) -> None:
        n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        groups = ", ".join(f"{m}: {c} tokens" for m, c in zip(self.modality_names, self.model.group_counts))
        rank_zero_info(f"MORPHEUS: {n_params:,} trainable parameters; {groups}")
        if self.logger is not None:
            scalar = {k: v for k, v in self.hparams.items() if isinstance(v, (int, float, bool, str))}
            scalar.update({f"n_features_{m}": len(self.hparams.modalities[m]["features"]) for m in self.modality_names})
            self.logger.log_hyperparams(scalar)

    def forward(
        self,
        batch: dict,
        generator: torch.Generator | None = None,
        uniform: torch.Tensor | None = None,
    ) -> ReconstructionOutput:
        """Run one masked-reconstruction pass on a batch.

        The masks come from ``uniform`` (per-sample draws, see
        ``morpheus_pl.nn.sample_visible``) when given, else from ``generator``.
        """
        return self.model.forward_pretrain(
            batch[keys.PATCHES],
            batch.get(keys.PATCH_MASK),
            batch[keys.OMICS],
            batch[keys.OMICS_PRESENT],
            self.hparams.mask_ratio,
            generator,
            uniform,
        )

    def eval_masks(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Return the ``forward`` arguments that fix a batch's evaluation masks.

        With the patients' cohort positions in the batch, each patient's masks are
        drawn from its own seed, so the scores do not depend on how patients are
        batched or spread over processes. Without them, one generator per batch
        index is used, which depends on the batching.
        """
        seed = self.hparams.eval_mask_seed * 1_000_003
        index = batch.get(keys.PATIENT_INDEX)
        if index is not None:
            draws = draws_per_sample(self.model.group_counts)
            return {"uniform": seeded_uniform(seed + index, draws)}
        generator = torch.Generator(device=batch[keys.PATCHES].device)
        generator.manual_seed(seed + batch_idx)
        return {"generator": generator}

    def configure_model(self) -> None:
        if self.hparams.get("torch_compile") and not getattr(self, "_compiled", False):
            self.model.compile_parts()
            self._compiled = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Masks and dropout of a step depend only on the seed, the epoch and the batch,
        # so a resumed run continues exactly where the stopped one left off.
        reseed_step(self.current_epoch, batch_idx, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        size = batch[keys.PATCHES].shape[0]
        self.log("train/loss", out.loss, batch_size=size, on_step=True, on_epoch=True, prog_bar=True)
        for m, loss in out.losses.items():
            self.log(f"train/loss_{m}", loss, batch_size=size, on_step=False, on_epoch=True)
        return out.loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        out = self(batch, **self.eval_masks(batch, batch_idx))

        metrics = self.eval_metrics[stage]
        for m in self.modality_names:
            index = self.model.tokenizers[m].index
            baseline = index(getattr(self, f"train_mean_{m}")[None].expand(out.targets[m].shape[0], -1))
            base_loss, _ = masked_group_l1(baseline, out.targets[m], index.valid, out.scored[m])
            weight = out.n_scored[m].to(torch.float32)
            metrics[f"loss_{m}"].update(out.losses[m].detach(), weight)
            metrics[f"baseline_loss_{m}"].update(base_loss, weight)
            metrics[f"pearson_{m}"].update(
                out.predictions[m], out.targets[m], index.index, index.valid, out.scored[m]
            )

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        total = 0.0
        values: dict[str, float] = {}
        for m in self.modality_names:
            loss = metrics[f"loss_{m}"].compute()
            total = total + loss
            values[f"{stage}/loss_{m}"] = loss
            values[f"{stage}/baseline_loss_{m}"] = metrics[f"baseline_loss_{m}"].compute()
            pearson = metrics[f"pearson_{m}"]
            values[f"{stage}/pearson_{m}"] = pearson.compute().float()
            # per_feature reads this process's states only; synchronise them first.
            with pearson.sync_context():
                per_feature = pearson.per_feature()
            self._log_pearson_histogram(stage, m, per_feature)
        values[f"{stage}/loss"] = total
        # The metrics are already synchronised, so every process logs the same values.
        # sync_dist averages these equal values, which keeps them (up to rounding) and
        # stops Lightning's warning about unsynchronised epoch-level values.
        for name, value in values.items():
            self.log(name, value, prog_bar=name == f"{stage}/loss", sync_dist=True)
        for metric in metrics.values():
            metric.reset()

    def _log_pearson_histogram(self, stage: str, modality: str, r: torch.Tensor) -> None:
        r = r[~torch.isnan(r)]
        if self.trainer.sanity_checking or r.numel() == 0 or not isinstance(self.logger, TensorBoardLogger):
            return
        if self.trainer.is_global_zero:
            self.logger.experiment.add_histogram(
                f"{stage}/pearson_per_feature_{modality}", r.cpu(), self.current_epoch
            )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Embed each patient and reconstruct the requested targets.

        The request (inputs and targets) is set by the ``ReconstructionWriter``; without
        one, the slide alone is the input and every modality is a target.
        """
        request = getattr(self, "prediction_request", None)
        if request is None:
            request = resolve_request(None, None, self.model.modalities, list(self.model.decoders))
        out = predict(
            self.model,
            batch[keys.PATCHES],
            batch.get(keys.PATCH_MASK),
            batch[keys.OMICS],
            batch[keys.OMICS_PRESENT],
            request.inputs,
            request.targets,
        )
        result: dict[str, Any] = {
            "patient_id": list(batch[keys.PATIENT_ID]),
            "embedding": out.embedding.float().cpu(),
            "reconstructions": {m: v.float().cpu() for m, v in out.reconstructions.items()},
            "measured": {m: batch[keys.OMICS][m].float().cpu() for m in request.targets},
            "present": {m: v.cpu() for m, v in batch[keys.OMICS_PRESENT].items()},
        }
        if request.token_outputs:
            result["slide_tokens"] = out.slide_tokens.float().cpu()
            result["omics_tokens"] = {m: v.float().cpu() for m, v in out.omics_tokens.items()}
        return result

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_epochs, hp.min_lr_ratio)
