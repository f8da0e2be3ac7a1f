"""Downstream tasks: the pre-trained encoder with a task head."""

from morpheus_pl.tasks.base import DownstreamTask
from morpheus_pl.tasks.classification import ClassificationTask
from morpheus_pl.tasks.survival import SurvivalTask

__all__ = ["ClassificationTask", "DownstreamTask", "SurvivalTask"]
