"""MORPHEUS masked-omics pre-training on whole-slide patch features and bulk omics.

Names are imported on first access, so that importing a light submodule (such as
``morpheus_pl.errors`` in a DataLoader worker) does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MaskedOmicsPretraining": "morpheus_pl.pretraining",
    "DownstreamTask": "morpheus_pl.tasks",
    "SurvivalTask": "morpheus_pl.tasks",
    "ClassificationTask": "morpheus_pl.tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'morpheus_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
