"""LightningDataModule for masked-omics pre-training and its downstream relatives."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from data_modules.cohort_data import CohortData, prepare_cohort
from data_modules.datasets import PatientBags, RowsOf, collate_bags
from data_modules.feature_store import PatchFeatureStore
from data_modules.omics import OmicsModality
from data_modules.splits import RandomSplit, SplitStrategy
from data_modules.targets import Targets
from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.seeding import EpochShuffle

log = logging.getLogger(__name__)

#: Marks the DataModule state inside a checkpoint.
DATA_STATE_FORMAT = "morpheus_pl.data/1"


class MorpheusDataModule(pl.LightningDataModule):
    """Patients with a slide bag and any subset of omics, split at patient level.

    Training draws ``n_patches`` patches per patient (one contiguous read per slide);
    validation, test and prediction serve whole bags, padded with a patch mask.
    With several processes, each validation and test patient is served once in
    total (see ``eval_sampler``).

    Args:
        cohort: Cohort table (CSV, TSV or parquet), one row per slide or per patient.
        patch_store: Patch-feature store (``.zarr``).
        modalities: Modality name to its AnnData file and token grouping.
        split: How patients are split: ``RandomSplit`` (the default, 15% validation,
            seed 1999), ``ColumnSplit`` (a cohort column), ``KFold`` or ``FewShot``.
        targets: Labels of a downstream task (``SurvivalTargets``, ``ClassTargets``);
            None for pre-training. Patients without a usable label are left out.
        patient_column: Cohort column of patient ids.
        slide_column: Cohort column of slide ids; None takes each patient's slides
            from the store's ``patient_id`` attributes.
        normalize_ids: Reduce TCGA sample and slide barcodes to patient ids.
        scale: Centre and scale each omics feature with training-split statistics.
        patch_dim: Expected patch-feature dimension; None accepts the store's.
        n_patches: Patches drawn per patient per training step.
        max_eval_patches: Cap on patches per slide at evaluation; None serves all.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation, test and prediction; None uses
            ``batch_size``.
        num_workers: DataLoader worker processes.
        multiprocessing_context: Start method of the workers. ``fork`` can deadlock
            with zarr's I/O thread; None picks ``forkserver`` where available, else
            ``spawn``.
        pin_memory: Pin host memory for faster GPU copies; None pins when CUDA is
            available.
        missing_slides: What to do with cohort slides or patients missing from the
            store: raise (``error``) or leave them out with a warning (``drop``).
        restore_from: Checkpoint whose saved splits, features, token groups, scaling
            and label facts replace those computed from this config. The CLI sets it
            from ``--ckpt_path`` so that ``validate``, ``test``, ``predict`` and resumed
            fits see the data the checkpoint was trained on.
        features_from: Pre-training checkpoint whose features, token groups and
            scaling replace those fitted here (splits and labels are still computed).
            The CLI sets it from the model's ``pretrained`` argument, because the
            pre-trained tokenizers expect exactly those groups.
        predict_split: Patients served by ``predict``: every prepared patient
            (``all``) or one split.
    """

    def __init__(
        self,
        cohort: str,
        patch_store: str,
        modalities: dict[str, OmicsModality] | None = None,
        split: SplitStrategy | None = None,
        targets: Targets | None = None,
        patient_column: str = "patient_id",
        slide_column: str | None = "slide_id",
        normalize_ids: bool = True,
        scale: bool = True,
        patch_dim: int | None = None,
        n_patches: int = 1024,
        max_eval_patches: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        multiprocessing_context: Literal["fork", "forkserver", "spawn"] | None = None,
        pin_memory: bool | None = None,
        missing_slides: Literal["error", "drop"] = "error",
        restore_from: str | None = None,
        features_from: str | None = None,
        predict_split: Literal["all", "train", "val", "test"] = "all",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["modalities", "split", "targets"])
        self.cohort = cohort
        self.patch_store = patch_store
        self.modalities = dict(modalities or {})
        self.split = split if split is not None else RandomSplit()
        self.targets = targets
        self.patient_column = patient_column
        self.slide_column = slide_column
        self.normalize_ids = normalize_ids
        self.scale = scale
        self.patch_dim = patch_dim
        self.n_patches = n_patches
        self.max_eval_patches = max_eval_patches
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory = pin_memory
        self.missing_slides = missing_slides
        self.restore_from = restore_from
        self.features_from = features_from
        self.predict_split = predict_split
        self._data: CohortData | None = None
        self._store: PatchFeatureStore | None = None

    @property
    def store(self) -> PatchFeatureStore:
        """The patch-feature store, opened read-only."""
        if self._store is None:
            self._store = PatchFeatureStore(self.patch_store, mode="r")
        return self._store

    @property
    def data(self) -> CohortData:
        """The prepared cohort, built on first use and cached."""
        if self._data is None:
            self._data = prepare_cohort(
                self.cohort,
                self.store,
                self.modalities,
                self.split,
                self.targets,
                patient_column=self.patient_column,
                slide_column=self.slide_column,
                normalize_ids=self.normalize_ids,
                scale=self.scale,
                missing_slides=self.missing_slides,
                expected_feature_dim=self.patch_dim,
                saved=read_data_state(self.restore_from) if self.restore_from else None,
                features_from=read_data_state(self.features_from) if self.features_from else None,
            )
        return self._data

    @property
    def feature_dim(self) -> int:
        """Patch-feature dimension ``D`` of the store."""
        return self.data.feature_dim

    @property
    def modality_specs(self) -> dict[str, dict[str, Any]]:
        """Per modality: feature ids, group names and members, training means."""
        train = self.data.indices("train")
        return {name: m.spec(train) for name, m in self.data.modalities.items()}

    @property
    def target_info(self) -> dict[str, Any] | None:
        """Facts about the labels the model needs (time bins, class names), or None."""
        return self.data.target_info

    def setup(self, stage: str | None = None) -> None:
        """Prepare the cohort (reads tables and omics, lists the store)."""
        _ = self.data

    def dataset(self, split: str, train_sampling: bool | None = None) -> PatientBags:
        """Dataset of one split (or ``all`` patients).

        ``train_sampling`` draws ``n_patches`` per patient; by default only the
        training split does.
        """
        index = np.arange(len(self.data.patients)) if split == "all" else self.data.indices(split)
        sampling = split == "train" if train_sampling is None else train_sampling
        return PatientBags(
            store=self.store,
            patients=[self.data.patients[i] for i in index],
            slides=[self.data.slides[i] for i in index],
            omics={m: RowsOf(d.values, index) for m, d in self.data.modalities.items()},
            present={m: d.present[index] for m, d in self.data.modalities.items()},
            n_patches=self.n_patches if sampling else None,
            max_patches=self.max_eval_patches,
            extra=self.extra_tensors(index),
        )

    def extra_tensors(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-patient tensors added to each item: cohort position and labels."""
        extra = {keys.PATIENT_INDEX: torch.as_tensor(index, dtype=torch.long)}
        if self.data.targets is not None:
            extra.update({k: v[torch.as_tensor(index)] for k, v in self.data.targets.tensors.items()})
        return extra

    def _loader(
        self, dataset: PatientBags, batch_size: int, shuffle: bool, sampler: Sampler | None = None
    ) -> DataLoader:
        workers = self.num_workers
        context = None
        if workers > 0:
            method = self.multiprocessing_context
            if method is None:
                available = multiprocessing.get_all_start_methods()
                method = "forkserver" if "forkserver" in available else "spawn"
            context = multiprocessing.get_context(method)
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_bags,
            pin_memory=pin,
            persistent_workers=workers > 0,
            multiprocessing_context=context,
        )

    def split_dataloader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Loader of whole bags of one split (or ``all``), in patient order."""
        dataset = self.dataset(split, train_sampling=False)
        return self._loader(dataset, batch_size or self.eval_batch_size, shuffle=False)

    def eval_sampler(self, dataset: PatientBags, split: str) -> Sampler | None:
        """Return the sampler that shares an evaluation split across processes, or None.

        Lightning's default ``DistributedSampler`` repeats patients to give every
        process the same number, and the repeats would count twice in the epoch
        losses and reconstruction scores. Lightning's ``UnrepeatedDistributedSampler``
        serves each patient once, so processes may run one batch fewer than others.
        Evaluation steps do not synchronise per batch, but DDP syncs buffers on the
        first one, so each process needs at least one patient.

        Returns:
            None in a single process or with an empty split, in which case Lightning
            adds its own sampler or none.

        Raises:
            InputError: When the split has fewer patients than there are processes.
        """
        trainer = self.trainer
        options = trainer.distributed_sampler_kwargs if trainer is not None else None
        if not options or options.get("num_replicas", 1) <= 1 or len(dataset) == 0:
            return None
        self.check_processes(options["num_replicas"], [split])
        return UnrepeatedDistributedSampler(dataset, shuffle=False, **options)

    def check_processes(self, processes: int, splits: list[str]) -> None:
        """Raise unless each of ``splits`` (if not empty) gives every process a patient.

        The command line calls this before anything is written, so that a run on too
        many devices stops without leaving a half-made run folder.
        """
        for split in splits:
            size = len(self.data.indices(split))
            if 0 < size < processes:
                raise InputError(
                    f"the {split} split of {self.cohort} has {size} patient(s) for "
                    f"{processes} processes, but every process needs at least one. Evaluate "
                    f"on at most {size} device(s) or enlarge the split (for example "
                    "data.init_args.split.init_args.val_fraction)"
                )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # Order and patch draws follow the run's seed and the epoch, so a resumed run
        # replays the epoch it was stopped in exactly.
        sampler = EpochShuffle(len(dataset), self.current_epoch)
        return self._loader(dataset, self.batch_size, shuffle=False, sampler=sampler)

    def current_epoch(self) -> int:
        """Return the trainer's epoch, or 0 outside a trainer."""
        return self.trainer.current_epoch if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        dataset = self.dataset("val")
        sampler = self.eval_sampler(dataset, "val")
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

    def test_dataloader(self) -> DataLoader:
        if len(self.data.indices("test")) == 0:
            raise InputError(
                f"the test split of {self.cohort} is empty; give the split a test set (for "
                "example RandomSplit test_fraction) or evaluate the validation split with "
                "the validate command"
            )
        dataset = self.dataset("test")
        sampler = self.eval_sampler(dataset, "test")
        return self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_split != "all" and len(self.data.indices(self.predict_split)) == 0:
            raise InputError(f"the {self.predict_split} split of {self.cohort} is empty; set predict_split")
        return self.split_dataloader(self.predict_split)

    def state_dict(self) -> dict[str, Any]:
        """Splits, features, groups, scaling and label facts, saved in checkpoints."""
        if self._data is None:
            return {}
        return {
            "format": DATA_STATE_FORMAT,
            "feature_dim": self.data.feature_dim,
            "patients": {
                name: [self.data.patients[i] for i in index] for name, index in self.data.splits.items()
            },
            "target_info": self.data.target_info,
            "modalities": {
                name: {
                    "features": list(m.features),
                    "group_names": list(m.groups.names),
                    "groups": [list(g) for g in m.groups.members],
                    "scaling": None
                    if m.scaling is None
                    else {"mean": m.scaling.mean.tolist(), "scale": m.scaling.scale.tolist()},
                }
                for name, m in self.data.modalities.items()
            },
        }


def read_data_state(path: str) -> dict[str, Any]:
    """Return the DataModule state saved in a checkpoint, with its path under ``source``."""
    from morpheus_pl.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(path)
    for value in checkpoint.values():
        if isinstance(value, dict) and value.get("format") == DATA_STATE_FORMAT:
            state = dict(value, source=str(path))
            # States saved before feature_dim was recorded lack it, and the model's
            # patch_dim has the same value.
            state.setdefault("feature_dim", checkpoint["hyper_parameters"].get("patch_dim"))
            return state
    raise InputError(
        f"{path} holds no morpheus_pl data state (splits, features, scaling); it was not "
        "written by a morpheus_pl run, so evaluate it with a fresh fit instead"
    )
