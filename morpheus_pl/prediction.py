"""Writing predictions: reconstructed omics and patient embeddings as AnnData files."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from data_modules.converters.omics import write_h5ad_atomic
from morpheus_pl.errors import InputError
from morpheus_pl.reconstruction import SLIDE, PredictionRequest, resolve_request

log = logging.getLogger(__name__)

class ReconstructionWriter(BasePredictionWriter):
    """Write the ``predict`` outputs: one ``.h5ad`` per target modality and embeddings.

    ``<target>.h5ad`` has the patients as ``obs``, with ``split``, the ``inputs_used``
    per patient and whether the target was ``measured``. Its ``var`` lists the features
    in the checkpoint's order. ``X`` contains the reconstruction and the ``measured`` layer
    the measured values (NaN where unknown), both in the units of the input file.
    ``embeddings.h5ad`` has the patient embeddings in ``obsm["X_morpheus"]`` and, with
    ``token_outputs``, the encoder outputs at the slide tokens (``obsm["slide_tokens"]``,
    shaped ``(n, P, width)``) and at each input modality's tokens.

    Args:
        output_dir: Folder for the files; None writes to ``predictions/<time>/`` beside
            the checkpoint's ``checkpoints/`` folder.
        inputs: Inputs of the encoder: ``slide`` plus any omics modalities.
        targets: Modalities to reconstruct; None reconstructs every modality with a
            decoder that is not an input.
        token_outputs: Also write the encoder outputs at the tokens.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        inputs: list[str] | None = None,
        targets: list[str] | None = None,
        token_outputs: bool = False,
    ) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir
        self.inputs = inputs
        self.targets = targets
        self.token_outputs = token_outputs

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise InputError(f"{type(pl_module).__name__} does not reconstruct omics; predict with a pre-training checkpoint")
        pl_module.prediction_request = resolve_request(
            self.inputs, self.targets, model.modalities, list(model.decoders), self.token_outputs
        )

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        request: PredictionRequest = pl_module.prediction_request
        if not predictions:
            log.warning("prediction produced no batch; nothing written")
            return
        merged = merge_outputs(predictions)
        out = Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")
        if trainer.world_size > 1:
            # NOTE: each process writes the patients it predicted into its own folder.
            out = out / f"rank{trainer.global_rank}"

        datamodule = trainer.datamodule
        split_of = patient_splits(datamodule)
        obs = pd.DataFrame(index=pd.Index(merged["patient_id"], name="patient_id"))
        obs["split"] = [split_of.get(p, "none") for p in obs.index]
        present = {m: merged["present"][m].numpy().astype(bool) for m in merged["present"]}
        used = [
            "+".join([SLIDE, *[m for m in request.inputs if present[m][i]]]) for i in range(len(obs))
        ]
        obs["inputs_used"] = used
        info = {
            "inputs": [SLIDE, *request.inputs],
            "checkpoint": str(getattr(trainer, "ckpt_path", None) or ""),
            "config": str(Path(trainer.default_root_dir) / "config.yaml"),
            "units": "those of the input file (the training scaling is inverted)",
        }

        for m in request.targets:
            features = list(pl_module.hparams.modalities[m]["features"])
            reconstruction = unscale(datamodule, m, merged["reconstructions"][m].numpy())
            measured = unscale(datamodule, m, merged["measured"][m].numpy())
            target_obs = obs.copy()
            target_obs["measured"] = present[m]
            adata = ad.AnnData(
                X=reconstruction.astype(np.float32),
                obs=target_obs,
                var=pd.DataFrame(index=pd.Index(features, name="feature")),
                layers={"measured": measured.astype(np.float32)},
            )
            adata.uns["morpheus"] = {**info, "target": m}
            write_h5ad_atomic(adata, out / f"{m}.h5ad")

        embeddings = ad.AnnData(obs=obs)
        embeddings.obsm["X_morpheus"] = merged["embedding"].numpy()
        if request.token_outputs:
            embeddings.obsm["slide_tokens"] = merged["slide_tokens"].numpy()
            for m, tokens in merged["omics_tokens"].items():
                embeddings.obsm[f"{m}_tokens"] = tokens.numpy()
        embeddings.uns["morpheus"] = info
        write_h5ad_atomic(embeddings, out / "embeddings.h5ad")
        log.info(
            "predictions for %d patients written to %s (targets %s)", len(obs), out, request.targets
        )


def merge_outputs(predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-batch prediction dicts along the patient axis."""
    first = predictions[0]
    merged: dict[str, Any] = {"patient_id": [p for batch in predictions for p in batch["patient_id"]]}
    for key, value in first.items():
        if key == "patient_id":
            continue
        if isinstance(value, dict):
            merged[key] = {m: torch.cat([b[key][m] for b in predictions]) for m in value}
        elif isinstance(value, torch.Tensor):
            merged[key] = torch.cat([b[key] for b in predictions])
    return merged


def unscale(datamodule: Any, modality: str, values: np.ndarray) -> np.ndarray:
    """Undo the DataModule's training-split scaling of a modality, if any."""
    data = getattr(datamodule, "data", None)
    scaling = None if data is None else data.modalities[modality].scaling
    if scaling is None:
        return values
    return values * scaling.scale + scaling.mean


def patient_splits(datamodule: Any) -> dict[str, str]:
    """Patient id to split name (``train``, ``val``, ``test``; the last one wins)."""
    data = getattr(datamodule, "data", None)
    if data is None:
        return {}
    names = {}
    for split in ("train", "val", "test"):
        for i in data.indices(split):
            names[data.patients[i]] = split
    return names
