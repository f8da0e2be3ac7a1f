"""Zarr v3 store of precomputed patch features, one group per slide.

Layout::

    <store>.zarr/
        zarr.json                  root attributes: format version, feature_dim, encoder
        slides/<slide_id>/
            zarr.json              attributes: patient_id, n_patches, source, ...,
                                   permutation_seed, complete
            features               (N, D) float16 or float32, chunks of ``chunk_rows`` rows
            coords                 (N, 2) int64, level-0 pixel (x, y) of each patch

Rows are written in a random permutation fixed at write time (its seed is stored),
with ``coords`` permuted alike. Any contiguous window of ``k`` rows is therefore a
uniform random subset of the slide, and sampling ``k`` patches is one contiguous read.

A slide's ``complete`` attribute is set only after both arrays are written. Readers
ignore incomplete slides and writers overwrite them, so an interrupted write never
leaves a partial slide that looks finished.

zarr v3 runs its I/O on a background event loop thread. A process forked after that
thread started can deadlock, so :class:`PatchFeatureStore` opens the store lazily in
each process, and the DataModules start workers with ``forkserver`` or ``spawn``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SLIDE_ID = re.compile(r"^[^/\\\s.][^/\\]*$")


def validate_slide_id(slide_id: str) -> None:
    """Raise InputError unless ``slide_id`` can name a slide group in the store."""
    if not _SLIDE_ID.match(slide_id):
        raise InputError(
            f"invalid slide id {slide_id!r}: ids must not contain '/' or '\\' nor start "
            "with a dot or whitespace; rename the slide"
        )


class RawRows:
    """Rows of an uncompressed, row-chunked zarr v3 array, read straight from its chunk files.

    The store writes features without compression, so rows ``[a, b)`` of a chunk are
    one byte range of its file. Reading that range with ``preadv`` into the output
    skips zarr's per-call machinery and reads no byte that is not delivered. Arrays in
    any other layout (a compressor, sharding, big-endian bytes) get no ``RawRows``.
    """

    def __init__(
        self, folder: Path, rows: int, chunk_rows: int, dim: int, dtype: np.dtype, fill: float
    ) -> None:
        self.folder = folder
        self.rows = rows
        self.chunk_rows = chunk_rows
        self.dim = dim
        self.dtype = dtype
        self.fill = fill

    @classmethod
    def open(cls, folder: Path) -> RawRows | None:
        """Return a reader of the array in ``folder``, or None when its layout differs."""
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        grid = meta.get("chunk_grid", {})
        encoding = meta.get("chunk_key_encoding", {})
        shape = meta.get("shape", [])
        plain = (
            meta.get("zarr_format") == 3
            and len(shape) == 2
            and meta.get("codecs") == [{"name": "bytes", "configuration": {"endian": "little"}}]
            and not meta.get("storage_transformers")
            and grid.get("name") == "regular"
            and encoding.get("name") == "default"
            and encoding.get("configuration", {}).get("separator", "/") == "/"
            and meta.get("data_type") in ("float16", "float32")
        )
        if not plain:
            return None
        chunk_rows, chunk_dim = grid["configuration"]["chunk_shape"]
        if chunk_dim != shape[1]:
            return None
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        fill = float(meta.get("fill_value") or 0.0)
        return cls(folder, shape[0], chunk_rows, shape[1], dtype, fill)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``[start, stop)``, clipped to the array like a slice."""
        start, stop = max(0, start), min(stop, self.rows)
        out = np.empty((max(0, stop - start), self.dim), dtype=self.dtype)
        if stop <= start:
            return out
        row_bytes = self.dim * self.dtype.itemsize
        for chunk in range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
            low = max(start, chunk * self.chunk_rows)
            high = min(stop, (chunk + 1) * self.chunk_rows)
            target = out[low - start : high - start]
            try:
                handle = os.open(self.folder / "c" / str(chunk) / "0", os.O_RDONLY)
            except FileNotFoundError:
                # zarr does not write a chunk that holds only the fill value.
                target[:] = self.fill
                continue
            try:
                offset = (low - chunk * self.chunk_rows) * row_bytes
                done = os.preadv(handle, [memoryview(target).cast("B")], offset)
            finally:
                os.close(handle)
            if done != target.nbytes:
                raise OSError(
                    f"{self.folder}: chunk {chunk} is shorter than its rows; the store is "
                    "damaged, so convert that slide again"
                )
        return out


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of one slide in the store."""

    slide_id: str
    patient_id: str
    n_patches: int


class PatchFeatureStore:
    """Read and write the patch-feature store.

    Args:
        path: Path of the ``.zarr`` directory.
        mode: ``"r"`` to read an existing store, ``"a"`` to add slides to an
            existing store, ``"w"`` to create a new one (an existing store at ``path``
            is an error unless it is empty).
        feature_dim: Feature dimension ``D``; required with ``mode="w"``.
        encoder: Name of the patch encoder; required with ``mode="w"``.
        dtype: Storage dtype of the features (``mode="w"``).
        chunk_rows: Rows per chunk (``mode="w"``). A window of ``k`` rows at a random
            offset reads at most ``k + 2 * chunk_rows`` rows, hence the small default.

    The store object is cheap to pickle: it holds only the path and opens zarr
    lazily in the process that first uses it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: Literal["r", "a", "w"] = "r",
        feature_dim: int | None = None,
        encoder: str | None = None,
        dtype: Literal["float16", "float32"] = "float16",
        chunk_rows: int = 256,
    ) -> None:
        self.path = Path(path)
        self.mode = mode
        self._root: zarr.Group | None = None
        self._pid: int | None = None
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._raw: dict[str, RawRows | None] = {}

        if mode == "w":
            if feature_dim is None or encoder is None:
                raise ValueError("feature_dim and encoder are required to create a store")
            if self.path.exists() and any(self.path.iterdir()):
                raise InputError(
                    f"{self.path} already exists and is not empty; choose a new path, or "
                    "open it with mode='a' to add slides"
                )
            root = zarr.open_group(str(self.path), mode="w")
            root.attrs.update(
                {
                    "morpheus_patch_store": FORMAT_VERSION,
                    "feature_dim": int(feature_dim),
                    "encoder": encoder,
                    "dtype": dtype,
                    "chunk_rows": int(chunk_rows),
                }
            )
            root.require_group("slides")
            self.mode = "a"
        elif not (self.path / "zarr.json").is_file():
            raise InputError(
                f"patch-feature store not found: {self.path.resolve()} has no zarr.json; check "
                "the path (relative paths start from the current directory) or write the "
                "store with PatchFeatureStore (docs/data-format.md)"
            )
        attrs = self.root.attrs.asdict()
        if "feature_dim" not in attrs or "morpheus_patch_store" not in attrs:
            raise InputError(
                f"{self.path} is a zarr store but not a patch-feature store (its root has no "
                "'feature_dim' and 'morpheus_patch_store' attributes); create it with the "
                "slide converter"
            )
        self.feature_dim = int(attrs["feature_dim"])
        self.encoder = str(attrs.get("encoder", "unknown"))
        self.dtype = str(attrs.get("dtype", "float16"))
        self.chunk_rows = int(attrs.get("chunk_rows", chunk_rows))

    # Pickling keeps only the path, so each DataLoader worker opens its own handle.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_root=None, _pid=None, _arrays={})
        return state

    @property
    def root(self) -> zarr.Group:
        """The root group, opened in the current process."""
        if self._root is None or self._pid != os.getpid():
            zarr_mode = "r" if self.mode == "r" else "r+"
            self._root = zarr.open_group(str(self.path), mode=zarr_mode)
            self._pid = os.getpid()
            self._arrays = {}
        return self._root

    def _array(self, slide_id: str, name: str) -> zarr.Array:
        root = self.root
        key = (slide_id, name)
        if key not in self._arrays:
            self._arrays[key] = root[f"slides/{slide_id}/{name}"]
        return self._arrays[key]

    def slides(self) -> Iterator[SlideInfo]:
        """Yield the complete slides; incomplete ones are skipped with a warning."""
        incomplete = []
        for slide_id, group in self.root["slides"].groups():
            attrs = group.attrs.asdict()
            if not attrs.get("complete", False):
                incomplete.append(slide_id)
                continue
            yield SlideInfo(slide_id, str(attrs["patient_id"]), int(attrs["n_patches"]))
        if incomplete:
            log.warning(
                "%s: %d slide(s) were not completely written and are ignored (first: %s); "
                "run the conversion again to finish them",
                self.path,
                len(incomplete),
                incomplete[0],
            )

    def slide_attrs(self, slide_id: str) -> dict[str, Any]:
        """Return the attributes of one slide."""
        return self.root[f"slides/{slide_id}"].attrs.asdict()

    def is_complete(self, slide_id: str) -> bool:
        """Return whether ``slide_id`` exists and was completely written."""
        try:
            group = self.root[f"slides/{slide_id}"]
        except KeyError:
            return False
        return bool(group.attrs.get("complete", False))

    def read_rows(self, slide_id: str, start: int, stop: int) -> np.ndarray:
        """Read rows ``[start, stop)`` of a slide's features: ``(stop - start, D)``."""
        if self.mode == "r" and hasattr(os, "preadv"):
            if slide_id not in self._raw:
                self._raw[slide_id] = RawRows.open(self.path / "slides" / slide_id / "features")
            raw = self._raw[slide_id]
            if raw is not None:
                return raw.read(start, stop)
        return self._array(slide_id, "features")[start:stop]

    def read_coords(self, slide_id: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read rows ``[start, stop)`` of a slide's coordinates: ``(rows, 2)``."""
        return self._array(slide_id, "coords")[start:stop]

    def write_slide(
        self,
        slide_id: str,
        features: np.ndarray,
        coords: np.ndarray | None = None,
        *,
        patient_id: str,
        seed: int = 1999,
        source: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write one slide with its rows in a seeded random permutation.

        Args:
            slide_id: Slide id; no ``/`` or ``\\``, and no leading dot or space.
            features: ``(N, D)`` or ``(1, N, D)`` patch features, all finite.
            coords: ``(N, 2)`` level-0 pixel coordinates, or None (stored as -1).
            patient_id: Patient the slide belongs to.
            seed: Seed of the row permutation, stored with the slide.
            source: Source file, stored with the slide.
            attrs: Further attributes (patch size at level 0, microns per pixel, ...).
            overwrite: Replace a complete slide of the same id. An incomplete slide
                is always replaced.

        Raises:
            InputError: The slide is empty, has the wrong feature dimension or
                non-finite values, or already exists.
        """
        if self.mode == "r":
            raise RuntimeError(f"{self.path} was opened read-only")
        where = f"slide {slide_id!r}" + (f" ({source})" if source else "")
        validate_slide_id(slide_id)
        features = np.asarray(features)
        if features.ndim == 3 and features.shape[0] == 1:
            features = features[0]
        if features.ndim != 2:
            raise InputError(f"{where}: features must be shaped (N, D), got {features.shape}")
        if features.shape[0] == 0:
            raise InputError(f"{where} has 0 patches; remove it from the input or re-extract it")
        if features.shape[1] != self.feature_dim:
            raise InputError(
                f"{where} has feature dimension {features.shape[1]} but the store {self.path} "
                f"contains {self.feature_dim}-d features (encoder {self.encoder!r}); write it to a "
                "store made for its encoder"
            )
        if not np.isfinite(features).all():
            bad = int((~np.isfinite(features)).any(axis=1).sum())
            raise InputError(
                f"{where} has NaN or infinite features in {bad} of {features.shape[0]} patches; "
                "re-extract the features of this slide"
            )
        n = features.shape[0]
        if coords is None:
            coords = np.full((n, 2), -1, dtype=np.int64)
        coords = np.asarray(coords)
        if coords.shape != (n, 2):
            raise InputError(f"{where}: coords must be shaped ({n}, 2), got {coords.shape}")
        if self.is_complete(slide_id) and not overwrite:
            raise InputError(
                f"{where} already exists in {self.path}; pass overwrite=True to replace it"
            )

        permutation = np.random.default_rng(seed).permutation(n)
        group = self.root.require_group("slides").create_group(slide_id, overwrite=True)
        rows = min(self.chunk_rows, n)
        group.create_array(
            "features",
            data=features[permutation].astype(self.dtype, copy=False),
            chunks=(rows, self.feature_dim),
            compressors=None,
        )
        group.create_array(
            "coords", data=coords[permutation].astype(np.int64), chunks=(rows, 2), compressors=None
        )
        meta = {
            "patient_id": str(patient_id),
            "n_patches": int(n),
            "source": source,
            "encoder": self.encoder,
            "permutation_seed": int(seed),
            **dict(attrs or {}),
        }
        group.attrs.update(meta)
        # Set last: readers treat a slide without it as never written.
        group.attrs["complete"] = True
        self._arrays.pop((slide_id, "features"), None)
        self._arrays.pop((slide_id, "coords"), None)
