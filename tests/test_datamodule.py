"""Tests of the DataModule and the patch loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules import Chunks, GeneSets, MorpheusDataModule, OmicsModality, RandomSplit
from data_modules.datasets import PatientBags, collate_bags
from data_modules.feature_store import PatchFeatureStore
from data_modules.synthetic import write_synthetic_cohort


def make_datamodule(cohort, **kwargs) -> MorpheusDataModule:
    options = dict(
        modalities={
            "rna": OmicsModality(str(cohort.omics["rna"]), GeneSets(str(cohort.gmt))),
            "dnam": OmicsModality(str(cohort.omics["dnam"]), Chunks(5)),
        },
        n_patches=16,
        batch_size=8,
        num_workers=0,
        split=RandomSplit(0.25),
    )
    options.update(kwargs)
    return MorpheusDataModule(str(cohort.cohort), str(cohort.store), **options)


def test_specs_and_splits(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    dm.setup("fit")
    assert dm.feature_dim == 16
    specs = dm.modality_specs
    assert list(specs) == ["rna", "dnam"]
    # GeneSets keeps only features that belong to a set: RNA0 to RNA35.
    assert specs["rna"]["features"] == [f"RNA{i}" for i in range(36)]
    assert len(specs["dnam"]["groups"]) == 5
    train, val = dm.data.indices("train"), dm.data.indices("val")
    assert len(train) == 30
    assert len(val) == 10
    assert set(train).isdisjoint(val)


def test_scaling_fitted_on_training_split(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    rna = dm.data.modalities["rna"]
    train = torch.as_tensor(dm.data.indices("train"))
    val = torch.as_tensor(dm.data.indices("val"))
    torch.testing.assert_close(rna.values[train].mean(0), torch.zeros(36), atol=1e-5, rtol=0)
    assert rna.values[val].mean(0).abs().max() > 0.05


def test_missing_modality_flagged(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    dnam = dm.data.modalities["dnam"]
    assert 0 < int(dnam.present.sum()) < 40
    assert torch.isnan(dnam.values[~dnam.present]).all()
    assert not torch.isnan(dnam.values[dnam.present]).any()


def test_training_batches_sample_fixed_patches(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["patches"].shape == (8, 16, 16)
    assert batch["patches"].dtype == torch.float16
    assert batch["patch_mask"].all()
    assert batch["omics"]["rna"].shape == (8, 36)
    assert batch["omics_present"]["dnam"].dtype == torch.bool


def test_validation_serves_whole_bags_with_mask(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    dm.setup("fit")
    store = PatchFeatureStore(tiny_cohort.store)
    sizes = {s.slide_id: s.n_patches for s in store.slides()}
    batch = next(iter(dm.val_dataloader()))
    for i, patient in enumerate(batch["patient_id"]):
        expected = sum(sizes[s] for s in dm.data.cohort.slides[patient])
        assert int(batch["patch_mask"][i].sum()) == expected
        assert torch.all(batch["patches"][i, expected:] == 0)


def test_sampling_reads_one_window_per_slide(tmp_path, monkeypatch):
    cohort = write_synthetic_cohort(tmp_path, n_patients=3, patches=(50, 50), slides_per_patient=(1, 1))
    store = PatchFeatureStore(cohort.store)
    reads = []
    original = store.read_rows

    def counting(slide_id, start, stop):
        reads.append((slide_id, start, stop))
        return original(slide_id, start, stop)

    monkeypatch.setattr(store, "read_rows", counting)
    slides = [[(s.slide_id, s.n_patches)] for s in store.slides()]
    bags = PatientBags(store, ["a", "b", "c"], slides, {}, {}, n_patches=10)
    for i in range(3):
        assert bags[i]["patches"].shape == (10, 16)
    assert len(reads) == 3
    assert all(stop - start == 10 for _, start, stop in reads)


def test_sampling_with_replacement_when_short(tiny_cohort):
    store = PatchFeatureStore(tiny_cohort.store)
    info = min(store.slides(), key=lambda s: s.n_patches)
    bags = PatientBags(store, ["p"], [[(info.slide_id, info.n_patches)]], {}, {}, n_patches=info.n_patches * 3)
    patches = bags[0]["patches"]
    assert patches.shape[0] == info.n_patches * 3
    assert len({tuple(r.tolist()) for r in patches}) <= info.n_patches


def test_multiple_slides_are_pooled(tiny_cohort):
    store = PatchFeatureStore(tiny_cohort.store)
    slides = list(store.slides())[:2]
    bags = PatientBags(store, ["p"], [[(s.slide_id, s.n_patches) for s in slides]], {}, {}, n_patches=None)
    assert bags[0]["patches"].shape[0] == sum(s.n_patches for s in slides)


def test_collate_pads_and_stacks_labels():
    items = [
        {"patient_id": "a", "patches": torch.ones(2, 3), "omics": {}, "omics_present": {}, "y": torch.tensor(1)},
        {"patient_id": "b", "patches": torch.ones(4, 3), "omics": {}, "omics_present": {}, "y": torch.tensor(0)},
    ]
    batch = collate_bags(items)
    assert batch["patches"].shape == (2, 4, 3)
    assert batch["patch_mask"].sum(1).tolist() == [2, 4]
    assert batch["y"].tolist() == [1, 0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_workers_do_not_deadlock(tiny_cohort, num_workers):
    dm = make_datamodule(tiny_cohort, num_workers=num_workers)
    dm.setup("fit")
    # The parent has opened the store (zarr's I/O thread is running) before workers start.
    dm.store.read_rows(next(dm.store.slides()).slide_id, 0, 1)
    seen = [p for batch in dm.train_dataloader() for p in batch["patient_id"]]
    assert sorted(seen) == sorted(dm.data.patients[i] for i in dm.data.indices("train"))
    val = [p for b in dm.val_dataloader() for p in b["patient_id"]]
    assert len(val) == 10


def test_state_dict_records_split_and_scaling(tiny_cohort):
    dm = make_datamodule(tiny_cohort)
    assert dm.state_dict() == {}
    dm.setup("fit")
    state = dm.state_dict()
    assert len(state["patients"]["train"]) == 30
    assert len(state["patients"]["val"]) == 10
    assert len(state["modalities"]["rna"]["scaling"]["mean"]) == 36
    assert np.all(np.array(state["modalities"]["rna"]["scaling"]["scale"]) > 0)
