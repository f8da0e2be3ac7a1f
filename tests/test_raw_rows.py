"""Direct chunk-file reads of the patch store equal zarr's reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from data_modules.datasets import all_finite
from data_modules.feature_store import PatchFeatureStore, RawRows


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    writer = PatchFeatureStore(tmp_path / "s.zarr", mode="w", feature_dim=6, encoder="test", chunk_rows=4)
    writer.write_slide("a", rng.standard_normal((10, 6)).astype(np.float16), patient_id="p")
    return PatchFeatureStore(tmp_path / "s.zarr")


@pytest.mark.parametrize("start, stop", [(0, 10), (0, 4), (3, 9), (4, 8), (9, 10), (7, 30), (5, 5)])
def test_raw_rows_equal_zarr_slices(store, start, stop):
    expected = zarr.open_array(str(store.path / "slides" / "a" / "features"), mode="r")[start:stop]
    got = store.read_rows("a", start, stop)
    assert store._raw["a"] is not None, "the store's own layout must take the direct path"
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_compressed_array_falls_back_to_zarr(tmp_path):
    array = zarr.create_array(str(tmp_path / "z"), shape=(8, 3), chunks=(4, 3), dtype="float16")
    array[:] = np.arange(24, dtype=np.float16).reshape(8, 3)
    assert RawRows.open(tmp_path / "z") is None


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_all_finite_matches_isfinite(dtype, bad):
    values = np.linspace(-3e4, 3e4, 60, dtype=dtype).reshape(10, 6)
    if bad is not None:
        values[7, 2] = bad
    assert all_finite(values) == bool(np.isfinite(values).all())
    assert all_finite(values) is (bad is None)
