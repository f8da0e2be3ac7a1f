"""Small synthetic cohorts with shared latent structure, for tests and benchmarks.

Each patient has a few latent factors. Omics values and patch features are noisy
linear functions of them, so masked omics are predictable from the rest, and the
labels (survival time, event flag, a three-class subtype) depend on them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_modules.feature_store import PatchFeatureStore


@dataclass
class SyntheticCohort:
    """Paths of a generated cohort."""

    root: Path
    cohort: Path
    store: Path
    omics: dict[str, Path]
    gmt: Path


def write_synthetic_cohort(
    root: str | os.PathLike[str],
    n_patients: int = 24,
    patch_dim: int = 16,
    patches: tuple[int, int] = (5, 40),
    features: dict[str, int] | None = None,
    missing: dict[str, float] | None = None,
    n_latent: int = 3,
    seed: int = 0,
    slides_per_patient: tuple[int, int] = (1, 2),
    split: bool = False,
) -> SyntheticCohort:
    """Write a cohort table, a patch-feature store, AnnData files and a GMT file.

    Args:
        root: Output folder (created).
        n_patients: Number of patients, ids ``TCGA-AA-0000`` upwards.
        patch_dim: Patch-feature dimension.
        patches: Inclusive range of patches per slide.
        features: Modality name to feature count; default ``rna`` 40, ``dnam`` 30.
        missing: Modality name to the fraction of patients lacking it.
        n_latent: Latent factors per patient.
        seed: Random seed.
        slides_per_patient: Inclusive range of slides per patient.
        split: Add a ``split`` column (train, val, test in 70/20/10 proportions).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    features = features or {"rna": 40, "dnam": 30}
    missing = missing or {}
    patients = [f"TCGA-AA-{i:04d}" for i in range(n_patients)]
    latent = rng.normal(size=(n_patients, n_latent))

    store_path = root / "features.zarr"
    store = PatchFeatureStore(store_path, mode="w", feature_dim=patch_dim, encoder="synthetic")
    slide_map = rng.normal(size=(n_latent, patch_dim))
    rows = []
    for i, patient in enumerate(patients):
        for s in range(int(rng.integers(slides_per_patient[0], slides_per_patient[1] + 1))):
            n = int(rng.integers(patches[0], patches[1] + 1))
            feats = latent[i] @ slide_map + rng.normal(scale=1.0, size=(n, patch_dim))
            coords = rng.integers(0, 10_000, size=(n, 2))
            slide_id = f"{patient}-01Z-00-DX{s + 1}"
            store.write_slide(slide_id, feats, coords, patient_id=patient, source="synthetic")
            rows.append({"patient_id": patient, "slide_id": slide_id})
    cohort = pd.DataFrame(rows)
    hazard = np.exp(0.8 * latent[:, 0])
    event_time = rng.exponential(24.0 / hazard)
    censor_time = rng.uniform(6.0, 60.0, size=n_patients)
    labels = pd.DataFrame(
        {
            "os_months": np.round(np.minimum(event_time, censor_time), 2),
            "os_event": (event_time <= censor_time).astype(int),
            "subtype": np.array(["alpha", "beta", "gamma"])[np.digitize(latent[:, 1], [-0.4, 0.4])],
        },
        index=patients,
    )
    cohort = cohort.join(labels, on="patient_id")
    if split:
        names = np.array(["train"] * n_patients, dtype=object)
        order = rng.permutation(n_patients)
        n_val, n_test = max(1, n_patients // 5), max(1, n_patients // 10)
        names[order[:n_val]] = "val"
        names[order[n_val : n_val + n_test]] = "test"
        cohort["split"] = cohort["patient_id"].map(dict(zip(patients, names)))
    cohort_path = root / "cohort.csv"
    cohort.to_csv(cohort_path, index=False)

    omics_paths: dict[str, Path] = {}
    gene_names: list[str] = []
    for name, n_features in features.items():
        weights = rng.normal(size=(n_latent, n_features))
        values = latent @ weights + rng.normal(scale=0.3, size=(n_patients, n_features))
        keep = rng.random(n_patients) >= missing.get(name, 0.0)
        var_names = [f"{name.upper()}{j}" for j in range(n_features)]
        gene_names = gene_names or var_names
        var = pd.DataFrame(
            {
                "chrom": [str(1 + j % 3) for j in range(n_features)],
                "start": [1000 * j for j in range(n_features)],
                "group": [f"g{j % 4}" for j in range(n_features)],
            },
            index=var_names,
        )
        adata = ad.AnnData(
            X=values[keep].astype(np.float32),
            obs=pd.DataFrame(index=[f"{p}-01A" for p, k in zip(patients, keep) if k]),
            var=var,
        )
        path = root / f"{name}.h5ad"
        adata.write_h5ad(path)
        omics_paths[name] = path

    gmt_path = root / "sets.gmt"
    with open(gmt_path, "w") as handle:
        for k in range(4):
            genes = gene_names[k * 8 : k * 8 + 12] + ["NOT_A_GENE"]
            handle.write("\t".join([f"SET_{k}", "synthetic", *genes]) + "\n")
    return SyntheticCohort(root, cohort_path, store_path, omics_paths, gmt_path)
