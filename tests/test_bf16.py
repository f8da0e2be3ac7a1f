"""bf16 autocast on CPU: the model core, the pre-training step and the task heads.

Tolerances: bf16 keeps 8 significant bits, so one rounding moves a value by up to
2^-8 (about 0.4%) of itself. With the modules built here on the tiny cohort (widths 16
to 256, torch 2.13 on CPU), the bf16 losses were within 1.6e-3 (relative) of the
float32 losses, and the outputs within 1.3e-2 of their largest magnitude. The bounds
leave room for rounding that accumulates through the layers.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from data_modules import ClassTargets, KFold, MorpheusDataModule, OmicsModality, SurvivalTargets
from data_modules.groupings import Chunks, GeneSets
from morpheus_pl import ClassificationTask, MaskedOmicsPretraining, SurvivalTask
from morpheus_pl import batch as keys
from morpheus_pl.nn import draws_per_sample, seeded_uniform

#: Relative tolerance of a bf16 loss against the float32 loss.
LOSS_RTOL = 1e-2
#: Tolerance of bf16 outputs, as a fraction of the largest float32 output magnitude.
OUTPUT_RTOL = 3e-2
SMALL = dict(width=32, num_prototypes=4, heads=2, mlp_dim=32)
DECODER = dict(decoder_width=32, decoder_heads=2, decoder_mlp_dim=32)
#: Module kind to its class, its label reader (a factory) and extra arguments.
TASKS = {
    "pretraining": (MaskedOmicsPretraining, None, DECODER),
    "survival": (SurvivalTask, lambda: SurvivalTargets(event_column="os_event", n_bins=3), {}),
    # The Cox risk is the head output itself, in bf16 under autocast.
    "cox": (SurvivalTask, lambda: SurvivalTargets(event_column="os_event"), {"loss": "cox"}),
    "classification": (ClassificationTask, lambda: ClassTargets("subtype"), {}),
}


def datamodule(cohort, targets=None) -> MorpheusDataModule:
    dm = MorpheusDataModule(
        str(cohort.cohort),
        str(cohort.store),
        modalities={
            "rna": OmicsModality(str(cohort.omics["rna"]), GeneSets(str(cohort.gmt))),
            "dnam": OmicsModality(str(cohort.omics["dnam"]), Chunks(5)),
        },
        split=KFold(4, 0),
        targets=targets,
        n_patches=8,
        batch_size=6,
        num_workers=0,
    )
    dm.setup()
    return dm


def build(name: str, cohort) -> tuple[pl.LightningModule, MorpheusDataModule]:
    """Return a small module of kind ``name`` and its DataModule on the cohort."""
    cls, targets, extra = TASKS[name]
    dm = datamodule(cohort, targets() if targets else None)
    options = dict(SMALL, **extra)
    if targets is not None:
        options["target_info"] = dm.target_info
    torch.manual_seed(0)
    return cls(patch_dim=dm.feature_dim, modalities=dm.modality_specs, **options), dm


def loss_of(name: str, module: pl.LightningModule, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the loss and the main output of one pass, with fixed masks for pre-training."""
    if name == "pretraining":
        uniform = seeded_uniform(batch[keys.PATIENT_INDEX], draws_per_sample(module.model.group_counts))
        out = module(batch, uniform=uniform)
        return out.loss, torch.cat([p.flatten(1) for p in out.predictions.values()], dim=1)
    outputs = module(batch)
    return module.compute_loss(outputs, batch), outputs


@pytest.mark.parametrize("name", list(TASKS))
def test_bf16_loss_close_to_float32(tiny_cohort, name):
    module, dm = build(name, tiny_cohort)
    module.eval()
    batch = next(iter(dm.val_dataloader()))

    with torch.no_grad():
        loss32, out32 = loss_of(name, module, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss16, out16 = loss_of(name, module, batch)

    assert torch.isfinite(loss16)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=LOSS_RTOL)
    scale = out32.abs().max().item()
    assert (out16.float() - out32).abs().max().item() <= OUTPUT_RTOL * scale


def test_bf16_pretraining_modality_losses_close(tiny_cohort):
    module, dm = build("pretraining", tiny_cohort)
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    uniform = seeded_uniform(batch[keys.PATIENT_INDEX], draws_per_sample(module.model.group_counts))

    with torch.no_grad():
        full = module(batch, uniform=uniform)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module(batch, uniform=uniform)

    for m, loss in full.losses.items():
        assert torch.isfinite(mixed.losses[m]), m
        assert mixed.losses[m].item() == pytest.approx(loss.item(), rel=LOSS_RTOL), m
        # Same masks on both sides: the same groups are scored.
        assert torch.equal(mixed.scored[m], full.scored[m]), m


def test_bf16_attention_masks_match_compute_dtype(tiny_cohort, monkeypatch):
    module, dm = build("pretraining", tiny_cohort)
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    assert not batch[keys.PATCH_MASK].all(), "the batch needs padded bags"

    calls = []
    attention = F.scaled_dot_product_attention

    def record(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.dtype, None if attn_mask is None else attn_mask.dtype))
        return attention(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = module.model
    omics = batch[keys.OMICS]
    visible = {
        m: batch[keys.OMICS_PRESENT][m][:, None].expand(-1, n)
        for m, n in zip(model.modalities, model.group_counts)
    }
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = model.encode(batch[keys.PATCHES], batch[keys.PATCH_MASK], omics, visible)
        model.decode(encoded, "rna")

    assert encoded.mask.dtype == torch.bool
    assert all(v.dtype == torch.bool for v in encoded.visible.values())
    masked = [(q, mask) for q, mask in calls if mask is not None]
    assert masked, "no attention call received a key mask"
    for query_dtype, mask_dtype in calls:
        assert query_dtype == torch.bfloat16
    for query_dtype, mask_dtype in masked:
        assert mask_dtype in (torch.bool, query_dtype)


class DtypeProbe(pl.Callback):
    """Callback that records the dtypes of an encoder activation and of the metric states."""

    def __init__(self) -> None:
        self.activation_dtypes: set[torch.dtype] = set()
        self.train_losses: list[torch.Tensor] = []
        self.state_dtypes: dict[str, torch.dtype] = {}

    def on_fit_start(self, trainer, module) -> None:
        core = module.model if hasattr(module, "model") else module.encoder
        core.blocks[0].attn.out_proj.register_forward_hook(
            lambda layer, inputs, output: self.activation_dtypes.add(output.dtype)
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_losses.append(outputs["loss"].detach())

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        roots = {"metrics": module.eval_metrics["val"]}
        if hasattr(module, "eval_losses"):
            roots["loss"] = module.eval_losses["val"]
        for label, root in roots.items():
            for name, metric in root.named_modules():
                if not isinstance(metric, Metric):
                    continue
                for state, values in metric.metric_state.items():
                    for value in values if isinstance(values, list) else [values]:
                        if value.is_floating_point():
                            self.state_dtypes[".".join(filter(None, (label, name, state)))] = value.dtype


@pytest.mark.parametrize("name", list(TASKS))
def test_bf16_mixed_fit_keeps_float32_metrics(tiny_cohort, tmp_path, name):
    module, dm = build(name, tiny_cohort)
    probe = DtypeProbe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe],
    )
    trainer.fit(module, datamodule=dm)

    # The precision plugin ran the forward pass in bf16.
    assert probe.activation_dtypes == {torch.bfloat16}
    assert len(probe.train_losses) == 2
    for loss in probe.train_losses:
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)

    expected = {
        "pretraining": ["metrics.loss_rna.mean_value", "metrics.pearson_dnam.sxy"],
        "survival": ["metrics.risk", "loss.mean_value"],
        "cox": ["metrics.risk", "loss.mean_value"],
        "classification": ["metrics.probs", "loss.mean_value"],
    }[name]
    for state in expected:
        assert state in probe.state_dtypes, sorted(probe.state_dtypes)
    for state, dtype in probe.state_dtypes.items():
        assert dtype in (torch.float32, torch.float64), state

    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert "val/loss" in logged
    for key, value in logged.items():
        assert value.dtype == torch.float32, key
    finite = ["val/loss", "val/loss_rna", "val/pearson_rna"] if name == "pretraining" else ["val/loss"]
    scores = {"survival": "val/c_index", "cox": "val/c_index", "classification": "val/auroc"}
    if name in scores:
        finite.append(scores[name])
    for key in finite:
        assert math.isfinite(logged[key].item()), key
