"""Shared fixtures: tiny generated cohorts and config files for the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from data_modules.synthetic import SyntheticCohort, write_synthetic_cohort

# Keep tests on few threads: small ops get slower with more threads on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> SyntheticCohort:
    """A 40-patient cohort shared by tests that only read it."""
    root = tmp_path_factory.mktemp("tiny")
    return write_synthetic_cohort(root, n_patients=40, missing={"dnam": 0.2}, seed=0)


@pytest.fixture
def own_cohort(tiny_cohort, tmp_path) -> SyntheticCohort:
    """A private copy of the tiny cohort that a test may modify."""
    root = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.root, root)
    return SyntheticCohort(
        root,
        root / "cohort.csv",
        root / "features.zarr",
        {m: root / p.name for m, p in tiny_cohort.omics.items()},
        root / "sets.gmt",
    )


def data_init_args(cohort: SyntheticCohort, **overrides) -> dict:
    """DataModule arguments for a synthetic cohort."""
    args = {
        "cohort": str(cohort.cohort),
        "patch_store": str(cohort.store),
        "modalities": {
            "rna": {
                "path": str(cohort.omics["rna"]),
                "grouping": {"class_path": "data_modules.GeneSets", "init_args": {"gmt": str(cohort.gmt)}},
            },
            "dnam": {
                "path": str(cohort.omics["dnam"]),
                "grouping": {"class_path": "data_modules.Chunks", "init_args": {"n_groups": 5}},
            },
        },
        "n_patches": 16,
        "batch_size": 8,
        "num_workers": 0,
        "split": {"class_path": "data_modules.RandomSplit", "init_args": {"val_fraction": 0.25}},
    }
    args.update(overrides)
    return args


def write_config(path: Path, cohort: SyntheticCohort, root_dir: Path, max_epochs: int = 2, **data) -> Path:
    """Write a small pre-training config for the CLI."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root_dir),
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root_dir), "name": "tiny"},
            },
        },
        "model": {
            "class_path": "morpheus_pl.MaskedOmicsPretraining",
            "init_args": {
                "width": 16,
                "num_prototypes": 4,
                "heads": 2,
                "mlp_dim": 16,
                "decoder_width": 16,
                "decoder_heads": 2,
                "decoder_mlp_dim": 16,
                "warmup_epochs": 1,
            },
        },
        "data": {"class_path": "data_modules.MorpheusDataModule", "init_args": data_init_args(cohort, **data)},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(*args: str, timeout: int = 600):
    """Run ``python -m morpheus_pl`` with arguments; return the completed process."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "morpheus_pl", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def pretrained_checkpoint(tiny_cohort, tmp_path_factory) -> Path:
    """``last.ckpt`` of a one-epoch pre-training run on the tiny cohort."""
    root = tmp_path_factory.mktemp("pretrain")
    config = write_config(root / "c.yaml", tiny_cohort, root / "runs", max_epochs=1)
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def write_task_config(
    path: Path, cohort: SyntheticCohort, root_dir: Path, model: dict, targets: dict, split: dict, max_epochs: int = 1
) -> Path:
    """Write a small downstream config for the CLI."""
    model = {
        "class_path": model["class_path"],
        "init_args": {"width": 16, "num_prototypes": 4, "heads": 2, "mlp_dim": 16, "warmup_epochs": 0, **model.get("init_args", {})},
    }
    config = {
        "seed_everything": 3,
        "trainer": {
            "max_epochs": max_epochs,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root_dir),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root_dir), "name": "task"},
            },
        },
        "model": model,
        "data": {
            "class_path": "data_modules.MorpheusDataModule",
            "init_args": data_init_args(cohort, split=split, targets=targets),
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
