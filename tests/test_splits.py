"""Tests of the patient-level split strategies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_modules import ClassTargets, FewShot, KFold, MorpheusDataModule, RandomSplit
from data_modules.splits import ColumnSplit
from morpheus_pl.errors import InputError


def table_of(n: int, **columns) -> tuple[list[str], pd.DataFrame]:
    patients = [f"p{i}" for i in range(n)]
    return patients, pd.DataFrame(columns, index=patients)


def test_kfold_covers_every_patient_once():
    patients, table = table_of(23)
    held_out = np.concatenate(
        [KFold(5, fold, seed=3).assign(patients, table, None, "c.csv")["test"] for fold in range(5)]
    )
    assert sorted(held_out.tolist()) == list(range(23))


def test_kfold_train_and_held_out_disjoint():
    patients, table = table_of(20)
    splits = KFold(4, 2).assign(patients, table, None, "c.csv")
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert np.array_equal(splits["val"], splits["test"])
    assert len(splits["train"]) + len(splits["test"]) == 20


def test_kfold_stratifies_events():
    rng = np.random.default_rng(0)
    strata = (rng.random(100) < 0.3).astype(int)
    patients, table = table_of(100)
    for fold in range(5):
        held_out = KFold(5, fold).assign(patients, table, strata, "c.csv")["test"]
        assert abs(strata[held_out].mean() - strata.mean()) < 0.06


def test_kfold_groups_never_straddle():
    rng = np.random.default_rng(1)
    sites = rng.choice(list("ABCDEFGHIJ"), size=60)
    patients, table = table_of(60, site=sites)
    strata = rng.integers(0, 2, size=60)
    fold_of = KFold(5, group_column="site").fold_of(patients, table, strata, "c.csv")
    for site in set(sites):
        assert len(set(fold_of[sites == site])) == 1


def test_kfold_missing_group_column():
    patients, table = table_of(10)
    with pytest.raises(InputError, match="missing group column 'site'"):
        KFold(2, group_column="site").assign(patients, table, None, "c.csv")


def test_kfold_invalid_fold():
    with pytest.raises(InputError, match=r"fold must lie in \[0, 5\)"):
        KFold(5, fold=5)


def test_slides_of_a_patient_stay_in_one_fold(own_cohort):
    # The synthetic cohort has one or two slides per patient.
    table = pd.read_csv(own_cohort.cohort)
    assert table["patient_id"].duplicated().any()
    folds_of_slide = {}
    for fold in range(4):
        dm = MorpheusDataModule(
            str(own_cohort.cohort), str(own_cohort.store), split=KFold(4, fold), num_workers=0
        )
        for i in dm.data.indices("test"):
            for slide, _ in dm.data.slides[i]:
                folds_of_slide.setdefault(slide, set()).add(fold)
    assert len(folds_of_slide) == len(table)
    assert all(len(folds) == 1 for folds in folds_of_slide.values())


def test_fewshot_exactly_k_per_class():
    rng = np.random.default_rng(2)
    strata = rng.integers(0, 3, size=90)
    patients, table = table_of(90)
    splits = FewShot(k=5, sampling=4).assign(patients, table, strata, "c.csv")
    assert np.bincount(strata[splits["train"]]).tolist() == [5, 5, 5]
    assert set(splits["train"]).isdisjoint(splits["test"])
    assert sorted([*splits["train"], *splits["test"]]) == list(range(90))
    assert np.array_equal(splits["val"], splits["test"])


def test_fewshot_samplings_differ_and_repeat():
    strata = np.repeat([0, 1], 30)
    patients, table = table_of(60)
    draws = [FewShot(k=3, sampling=s).assign(patients, table, strata, "c.csv")["train"] for s in range(3)]
    again = FewShot(k=3, sampling=1).assign(patients, table, strata, "c.csv")["train"]
    assert np.array_equal(draws[1], again)
    assert not np.array_equal(draws[0], draws[1])


def test_fewshot_class_too_small():
    strata = np.array([0] * 10 + [1] * 3)
    patients, table = table_of(13)
    with pytest.raises(InputError, match="class '1' has 3 labelled patient"):
        FewShot(k=3).assign(patients, table, strata, "c.csv")


def test_fewshot_fit_sees_only_its_patients(own_cohort):
    dm = MorpheusDataModule(
        str(own_cohort.cohort),
        str(own_cohort.store),
        split=FewShot(k=2, sampling=1),
        targets=ClassTargets("subtype"),
        batch_size=4,
        num_workers=0,
    )
    dm.setup("fit")
    seen = [p for batch in dm.train_dataloader() for p in batch["patient_id"]]
    labels = [int(batch_label) for batch in dm.train_dataloader() for batch_label in batch["label"]]
    evaluated = {p for batch in dm.val_dataloader() for p in batch["patient_id"]}
    assert len(seen) == 6
    assert np.bincount(labels).tolist() == [2, 2, 2]
    assert evaluated.isdisjoint(seen)
    assert len(evaluated) + len(seen) == len(dm.data.patients)


def test_random_split_stratified_proportions():
    strata = np.array([0] * 80 + [1] * 20)
    patients, table = table_of(100)
    splits = RandomSplit(0.2, 0.1, seed=4).assign(patients, table, strata, "c.csv")
    assert len(splits["val"]) == 20
    assert len(splits["test"]) == 10
    assert strata[splits["val"]].sum() == 4
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(100))


def test_random_split_reproducible():
    patients, table = table_of(50)
    first = RandomSplit(0.2, seed=5).assign(patients, table, None, "c.csv")
    second = RandomSplit(0.2, seed=5).assign(patients, table, None, "c.csv")
    other = RandomSplit(0.2, seed=6).assign(patients, table, None, "c.csv")
    assert np.array_equal(first["val"], second["val"])
    assert not np.array_equal(first["val"], other["val"])


def test_column_split_unknown_value():
    patients, table = table_of(3, split=["train", "val", "holdout"])
    with pytest.raises(InputError, match="patient 'p2' has split 'holdout'"):
        ColumnSplit().assign(patients, table, None, "c.csv")
