"""Data side of morpheus_pl: stores, cohort tables, token groupings and DataModules.

Names are imported on first access, so that DataLoader worker processes, which
unpickle only the dataset, do not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MorpheusDataModule": "data_modules.datamodule",
    "PatchFeatureStore": "data_modules.feature_store",
    "OmicsModality": "data_modules.omics",
    "TokenGrouping": "data_modules.groupings",
    "GeneSets": "data_modules.groupings",
    "VarColumn": "data_modules.groupings",
    "Chunks": "data_modules.groupings",
    "GenomicBins": "data_modules.groupings",
    "CorrelationClusters": "data_modules.groupings",
    "SplitStrategy": "data_modules.splits",
    "RandomSplit": "data_modules.splits",
    "ColumnSplit": "data_modules.splits",
    "KFold": "data_modules.splits",
    "FewShot": "data_modules.splits",
    "Targets": "data_modules.targets",
    "SurvivalTargets": "data_modules.targets",
    "ClassTargets": "data_modules.targets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
