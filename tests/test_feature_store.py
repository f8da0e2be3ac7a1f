"""Tests of the zarr patch-feature store."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.feature_store import PatchFeatureStore
from morpheus_pl.errors import InputError


def make_store(tmp_path, dim=4, chunk_rows=8):
    return PatchFeatureStore(
        tmp_path / "s.zarr", mode="w", feature_dim=dim, encoder="test", chunk_rows=chunk_rows
    )


def test_roundtrip_permuted_rows_keep_coords(tmp_path):
    store = make_store(tmp_path)
    features = np.arange(40, dtype=np.float32).reshape(10, 4)
    coords = np.stack([np.arange(10), np.arange(10) * 2], axis=1)
    store.write_slide("s1", features, coords, patient_id="P1", seed=3)

    reader = PatchFeatureStore(tmp_path / "s.zarr")
    rows = reader.read_rows("s1", 0, 10)
    stored_coords = reader.read_coords("s1")
    assert sorted(rows[:, 0].tolist()) == sorted(features[:, 0].tolist())
    assert not np.array_equal(rows, features)  # permuted
    # Each row still sits beside its own coordinates.
    original = {tuple(c): f for c, f in zip(coords.tolist(), features)}
    for c, f in zip(stored_coords.tolist(), rows):
        np.testing.assert_array_equal(original[tuple(c)], f)
    assert reader.slide_attrs("s1")["permutation_seed"] == 3
    assert [s.slide_id for s in reader.slides()] == ["s1"]


def test_accepts_leading_singleton_axis(tmp_path):
    store = make_store(tmp_path)
    store.write_slide("s1", np.ones((1, 5, 4)), patient_id="P1")
    assert store.read_rows("s1", 0, 5).shape == (5, 4)


def test_rejects_zero_patches(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(InputError, match="slide 's0' has 0 patches"):
        store.write_slide("s0", np.zeros((0, 4)), patient_id="P1")
    assert not store.is_complete("s0")


def test_rejects_wrong_dimension(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(InputError, match="feature dimension 6 but the store .* contains 4-d"):
        store.write_slide("s1", np.zeros((3, 6)), patient_id="P1")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite(tmp_path, bad):
    store = make_store(tmp_path)
    features = np.zeros((5, 4))
    features[2, 1] = bad
    with pytest.raises(InputError, match="NaN or infinite features in 1 of 5 patches"):
        store.write_slide("s1", features, patient_id="P1", source="a.h5")
    assert not store.is_complete("s1")


def test_incomplete_slide_is_ignored_and_replaced(tmp_path):
    store = make_store(tmp_path)
    store.write_slide("s1", np.ones((3, 4)), patient_id="P1")
    # Simulate a crash after the arrays were written but before completion.
    store.root["slides/s1"].attrs["complete"] = False
    assert list(store.slides()) == []
    store.write_slide("s1", np.full((2, 4), 7.0), patient_id="P1")
    assert [s.n_patches for s in store.slides()] == [2]


def test_existing_slide_needs_overwrite(tmp_path):
    store = make_store(tmp_path)
    store.write_slide("s1", np.ones((3, 4)), patient_id="P1")
    with pytest.raises(InputError, match="already exists"):
        store.write_slide("s1", np.ones((3, 4)), patient_id="P1")
    store.write_slide("s1", np.ones((2, 4)), patient_id="P1", overwrite=True)
    assert store.slide_attrs("s1")["n_patches"] == 2


def test_refuses_non_empty_path(tmp_path):
    make_store(tmp_path)
    with pytest.raises(InputError, match="already exists and is not empty"):
        make_store(tmp_path)


def test_missing_store_is_clear(tmp_path):
    with pytest.raises(InputError, match="patch-feature store not found"):
        PatchFeatureStore(tmp_path / "nothing.zarr")


def test_invalid_slide_id(tmp_path):
    store = make_store(tmp_path)
    with pytest.raises(InputError, match="invalid slide id"):
        store.write_slide("a/b", np.ones((2, 4)), patient_id="P1")


def test_store_pickles_without_open_handles(tmp_path):
    import pickle

    store = make_store(tmp_path)
    store.write_slide("s1", np.ones((3, 4)), patient_id="P1")
    store.read_rows("s1", 0, 1)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._root is None
    assert clone.read_rows("s1", 0, 3).shape == (3, 4)
