"""Loader throughput: k patches per slide from the store against whole-slide HDF5 reads."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from data_modules.datasets import PatientBags
from data_modules.feature_store import PatchFeatureStore
from morpheus_pl.benchmarks.common import machine


def read_bytes() -> int:
    """Bytes this process has passed through read system calls (``rchar``), cache hits included."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def run(
    slides: int = 12,
    patches_per_slide: int = 20_000,
    dim: int = 1536,
    draw: int = 1024,
    samples: int = 120,
    root: str | None = None,
) -> dict:
    """Write the same slides to a store and to HDF5 files, then draw ``samples`` bags from each.

    Both sides read float16 features from a warm page cache (one untimed pass first).
    """
    folder = Path(tempfile.mkdtemp(prefix="morpheus-loader-", dir=root))
    try:
        rng = np.random.default_rng(0)
        store = PatchFeatureStore(folder / "s.zarr", mode="w", feature_dim=dim, encoder="bench")
        for s in range(slides):
            features = rng.standard_normal((patches_per_slide, dim), dtype=np.float32).astype(np.float16)
            store.write_slide(f"slide{s}", features, patient_id=f"p{s}")
            with h5py.File(folder / f"slide{s}.h5", "w") as handle:
                handle.create_dataset("features", data=features)
        # The product's training dataset: one patient per slide, ``draw`` patches each.
        bags = PatientBags(
            PatchFeatureStore(folder / "s.zarr"),
            patients=[f"p{s}" for s in range(slides)],
            slides=[[(f"slide{s}", patches_per_slide)] for s in range(slides)],
            omics={},
            present={},
            n_patches=draw,
        )
        choices = np.random.default_rng(1).integers(0, slides, size=samples)

        def from_store() -> None:
            for i, s in enumerate(choices):
                bags[int(s), i]

        def from_hdf5() -> None:
            picker = np.random.default_rng(3)
            for s in choices:
                with h5py.File(folder / f"slide{s}.h5", "r") as handle:
                    features = handle["features"][:]
                features[picker.choice(patches_per_slide, size=draw, replace=False)]

        results = {}
        for name, function in (("store", from_store), ("hdf5", from_hdf5)):
            function()  # warm the page cache and the store's array handles
            before, start = read_bytes(), time.perf_counter()
            function()
            seconds = time.perf_counter() - start
            results[name] = {
                "samples_per_second": samples / seconds,
                "bytes_read_per_sample": (read_bytes() - before) / samples,
            }
        delivered = draw * dim * 2
        return {
            "slides": slides,
            "patches_per_slide": patches_per_slide,
            "dim": dim,
            "draw": draw,
            "samples": samples,
            "store": results["store"],
            "hdf5": results["hdf5"],
            "speedup": results["store"]["samples_per_second"] / results["hdf5"]["samples_per_second"],
            "store_read_amplification": results["store"]["bytes_read_per_sample"] / delivered,
            "hdf5_read_amplification": results["hdf5"]["bytes_read_per_sample"] / delivered,
            "machine": machine(),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
