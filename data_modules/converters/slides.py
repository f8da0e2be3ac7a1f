"""Convert per-slide patch-feature files (HDF5 or PyTorch) into the patch-feature store.

Supported layouts, one file per slide, the slide id being the file stem:

* HDF5 (``.h5``, ``.hdf5``) as CLAM and TRIDENT write them: a dataset ``features``
  shaped ``(N, D)`` or ``(1, N, D)`` and an optional dataset ``coords`` shaped
  ``(N, 2)`` or ``(1, N, 2)`` (level-0 pixel x, y). Scalar attributes of the file and
  of both datasets are kept with the slide. An encoder name is read from one of the
  attributes in :data:`ENCODER_KEYS`.
* PyTorch (``.pt``): a tensor or NumPy array shaped ``(N, D)`` or ``(1, N, D)``, or a
  dict with ``features``, optional ``coords`` and optional scalar entries (an encoder
  name under one of :data:`ENCODER_KEYS`). Files are loaded with
  ``torch.load(weights_only=True)``, which allows NumPy arrays and nothing else that
  could run code.

A conversion first reads only the shapes and metadata of every file (the pre-scan),
so mixed feature dimensions, mixed encoder names, unreadable files and unknown
patient ids fail before anything is written. It then writes the slides that the store
does not hold yet, each marked complete only once written, so a killed conversion is
resumed by running it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from tqdm import tqdm

from data_modules.cohort import normalize_patient_id, read_table
from data_modules.feature_store import PatchFeatureStore, validate_slide_id
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
TORCH_SUFFIXES = (".pt",)
SLIDE_SUFFIXES = HDF5_SUFFIXES + TORCH_SUFFIXES
#: Attribute names (HDF5) or dict keys (.pt) that declare the patch encoder.
ENCODER_KEYS = ("encoder", "encoder_name", "patch_encoder", "model_name")
#: Source attributes copied to the top level of the slide's attributes when present.
PROMOTED_ATTRS = ("patch_size_level0", "mpp")
DEFAULT_SEED = 1999
FLOAT16_MAX = float(np.finfo(np.float16).max)
LAYOUTS_EXPECTED = (
    "an HDF5 file (.h5, .hdf5) with a dataset 'features' shaped (N, D) or (1, N, D) and "
    "an optional dataset 'coords' shaped (N, 2) or (1, N, 2), or a .pt file containing such a "
    "tensor or a dict with 'features' and optional 'coords'"
)
_TCGA_PATIENT = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}")
# Root attribute of the store: the base seed every slide's permutation seed comes from.
SEED_ATTR = "permutation_base_seed"


class EmptySlideFileError(InputError):
    """A slide file has 0 bytes or 0 patches."""


@dataclass(frozen=True)
class SlideFile:
    """Shapes and metadata of one slide file, read by the pre-scan.

    Attributes:
        path: The file.
        source: Path relative to the source folder (stored as the slide's ``source``).
        slide_id: File stem.
        patient_id: Patient of the slide.
        layout: Short description of the layout found, for messages.
        n_patches: Number of patches ``N``.
        feature_dim: Feature dimension ``D``.
        has_coords: Whether the file contains coordinates.
        encoder: Encoder name declared by the file, or None.
        attrs: JSON-compatible scalar attributes of the file, by object
            (``file``, ``features``, ``coords``).
    """

    path: Path
    source: str
    slide_id: str
    patient_id: str
    layout: str
    n_patches: int
    feature_dim: int
    has_coords: bool
    encoder: str | None
    attrs: dict[str, dict[str, Any]]


@dataclass
class SlideRecord:
    """One slide in memory, ready to be written.

    Attributes:
        slide_id: Slide id.
        patient_id: Patient id.
        features: ``(N, D)`` patch features.
        coords: ``(N, 2)`` level-0 pixel coordinates, or None.
        source: Source file, stored with the slide.
        attrs: Further slide attributes.
        seed: Permutation seed; None derives it from the base seed and the slide id
            (:func:`slide_seed`).
    """

    slide_id: str
    patient_id: str
    features: np.ndarray
    coords: np.ndarray | None = None
    source: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass
class SlideConversionSummary:
    """Outcome of :func:`convert_slides`.

    Attributes:
        store: Path of the store.
        converted: Slides written by this run.
        already_converted: Slides skipped because the store already held them complete.
        patches_written: Patches written by this run.
        skipped: ``(file, reason)`` of each file that was not converted.
    """

    store: Path
    converted: int = 0
    already_converted: int = 0
    patches_written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """Return a few lines for the end of a command-line run."""
        if self.converted == 0 and self.already_converted:
            head = f"{self.store}: all {self.already_converted} slides already converted; nothing written"
        else:
            head = (
                f"{self.store}: {self.converted} slide(s) converted ({self.patches_written} "
                f"patches written), {self.already_converted} already converted"
            )
        lines = [f"{head}, {len(self.skipped)} file(s) skipped"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def slide_seed(base_seed: int, slide_id: str) -> int:
    """Derive a slide's permutation seed from the base seed and the slide id.

    The seed depends on nothing else (not on the order in which slides are written),
    so an interrupted and resumed conversion permutes every slide as an uninterrupted
    one does. The result is the first 4 bytes of a SHA-256 digest, an integer below
    2**32 that any JSON reader keeps exactly.
    """
    digest = hashlib.sha256(f"{int(base_seed)}:{slide_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --- finding and reading files ------------------------------------------------------


def find_slide_files(src: Path, pattern: str | None) -> tuple[list[Path], list[tuple[str, str]]]:
    """List the slide files under ``src``.

    Args:
        src: Source folder.
        pattern: Glob relative to ``src`` (``**`` recurses). None takes the files
            directly in ``src`` with a supported extension.

    Returns:
        The files, sorted, and ``(name, reason)`` of files left out (only without a
        pattern: files with other extensions).

    Raises:
        InputError: ``src`` is not a folder, nothing matched, or a file matched by
            ``pattern`` has an unsupported extension.
    """
    if not src.is_dir():
        raise InputError(f"source folder not found: {src.resolve()}; pass the folder of slide files as --src")
    ignored: list[tuple[str, str]] = []
    if pattern is None:
        files = []
        for path in sorted(src.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() in SLIDE_SUFFIXES:
                files.append(path)
            else:
                ignored.append((path.name, f"extension {path.suffix or '(none)'!r} is not a slide file"))
        where = f"{src} (files ending in {', '.join(SLIDE_SUFFIXES)})"
    else:
        try:
            files = sorted(p for p in src.glob(pattern) if p.is_file())
        except (ValueError, NotImplementedError) as error:
            raise InputError(
                f"invalid --pattern {pattern!r} ({error}); give a glob relative to --src, such "
                "as '*.h5' or '**/*.h5'"
            ) from error
        unsupported = [p for p in files if p.suffix.lower() not in SLIDE_SUFFIXES]
        if unsupported:
            raise InputError(
                f"{unsupported[0]}: unsupported file extension {unsupported[0].suffix or '(none)'!r} "
                f"({len(unsupported)} file(s) matched by --pattern {pattern!r} have one). Expected "
                f"{LAYOUTS_EXPECTED}; narrow --pattern to the slide files"
            )
        where = f"{src} with --pattern {pattern!r}"
    if not files:
        raise InputError(f"no slide files found in {where}; check --src and --pattern")
    return files, ignored


def _json_scalar(value: Any) -> Any:
    """Return an attribute value as a JSON-compatible value, or None to drop it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bool, int, float)):
        if isinstance(value, float) and not np.isfinite(value):
            return str(value)
        return value
    if isinstance(value, np.ndarray) and value.size <= 16 and value.dtype.kind in "biuf":
        return [_json_scalar(v) for v in value.ravel()]
    return None


def _scalar_attrs(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, value in items:
        converted = _json_scalar(value)
        if converted is not None:
            out[str(key)] = converted
    return out


def _declared_encoder(attrs: Mapping[str, Mapping[str, Any]], path: Path) -> str | None:
    names = {
        str(attrs[obj][key])
        for obj in ("file", "features")
        for key in ENCODER_KEYS
        if key in attrs.get(obj, {})
    }
    if len(names) > 1:
        raise InputError(
            f"{path}: the file declares several encoder names {sorted(names)}; fix its "
            f"attributes ({', '.join(ENCODER_KEYS)})"
        )
    return names.pop() if names else None


def _rows_shape(shape: tuple[int, ...], width: int | None) -> tuple[int, int] | None:
    """Return ``(N, D)`` for a ``(N, D)`` or ``(1, N, D)`` shape, else None."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or (width is not None and shape[1] != width):
        return None
    return int(shape[0]), int(shape[1])


def _check_shapes(
    path: Path, features_shape: tuple[int, ...], coords_shape: tuple[int, ...] | None
) -> tuple[int, int]:
    rows = _rows_shape(features_shape, None)
    if rows is None:
        raise InputError(
            f"{path}: unknown layout, 'features' is shaped {features_shape}. Expected "
            f"{LAYOUTS_EXPECTED}"
        )
    n, dim = rows
    if n == 0:
        raise EmptySlideFileError(
            f"{path}: the file contains 0 patches (features shaped {features_shape}); "
            "re-extract the slide's features or move the file out of --src"
        )
    if dim == 0:
        raise InputError(f"{path}: features have dimension 0 (shape {features_shape}); re-extract them")
    if coords_shape is not None and _rows_shape(coords_shape, 2) != (n, 2):
        raise InputError(
            f"{path}: 'coords' is shaped {coords_shape} but 'features' {features_shape}; "
            f"expected coords shaped ({n}, 2) or (1, {n}, 2)"
        )
    return n, dim


def _load_torch(path: Path) -> Any:
    """Load a .pt file with weights_only=True, allowing NumPy arrays."""
    import torch

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    reconstruct = multiarray._reconstruct
    allowed = [
        np.ndarray,
        np.dtype,
        reconstruct,
        # Files saved with NumPy 1 name the function by its old module.
        (reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    allowed += [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64")]
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                # Files in the legacy (non-zip) format cannot be memory-mapped.
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for unreadable files
        raise InputError(
            f"{path}: cannot load it with torch.load(weights_only=True) ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}). Expected {LAYOUTS_EXPECTED}"
        ) from error


def _is_array(value: Any) -> bool:
    import torch

    return isinstance(value, (torch.Tensor, np.ndarray))


def _as_numpy(value: Any) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _torch_parts(path: Path, content: Any) -> tuple[Any, Any, dict[str, Any], str]:
    """Split loaded .pt content into features, coords (or None), other entries, layout."""
    if _is_array(content):
        return content, None, {}, "pt array"
    if isinstance(content, Mapping):
        if "features" not in content or not _is_array(content["features"]):
            raise InputError(
                f"{path}: unknown layout, a dict without a 'features' tensor (keys "
                f"{sorted(map(str, content))[:10]}). Expected {LAYOUTS_EXPECTED}"
            )
        coords = content.get("coords")
        if coords is not None and not _is_array(coords):
            raise InputError(f"{path}: 'coords' is a {type(coords).__name__}, expected a tensor or array")
        others = {k: v for k, v in content.items() if k not in ("features", "coords")}
        return content["features"], coords, _scalar_attrs(others.items()), "pt dict"
    raise InputError(
        f"{path}: unknown layout, the file contains a {type(content).__name__}. Expected "
        f"{LAYOUTS_EXPECTED}"
    )


def _open_hdf5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(
            f"{path}: cannot open it as HDF5 ({error}); the file may be truncated or in "
            f"another format. Expected {LAYOUTS_EXPECTED}"
        ) from error


def _hdf5_datasets(path: Path, handle: h5py.File) -> tuple[h5py.Dataset, h5py.Dataset | None]:
    features = handle.get("features")
    if not isinstance(features, h5py.Dataset):
        raise InputError(
            f"{path}: unknown layout, no dataset 'features' (top-level keys: "
            f"{sorted(handle.keys())[:10]}). Expected {LAYOUTS_EXPECTED}"
        )
    coords = handle.get("coords")
    if coords is not None and not isinstance(coords, h5py.Dataset):
        raise InputError(f"{path}: 'coords' is not a dataset. Expected {LAYOUTS_EXPECTED}")
    for name, dataset in (("features", features), ("coords", coords)):
        if dataset is not None and not np.issubdtype(dataset.dtype, np.number):
            raise InputError(f"{path}: '{name}' has dtype {dataset.dtype}, expected numbers")
    return features, coords


def scan_slide_file(path: Path, src: Path, patients: Mapping[str, str] | None) -> SlideFile:
    """Read the shapes and metadata of one slide file without reading its features.

    Args:
        path: The slide file.
        src: Source folder (for the stored relative path).
        patients: Slide id to patient id from a slide table, or None.

    Raises:
        EmptySlideFileError: The file has 0 bytes or 0 patches.
        InputError: Unknown layout, unreadable file, shapes that do not fit, an invalid
            slide id or no patient id for the slide.
    """
    slide_id = path.stem
    validate_slide_id(slide_id)
    patient_id = _patient_of(path, slide_id, patients)
    if path.stat().st_size == 0:
        raise EmptySlideFileError(
            f"{path}: empty file (0 bytes), probably an interrupted download or extraction; "
            "download or extract it again, or move it out of --src"
        )

    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        with _open_hdf5(path) as handle:
            features, coords = _hdf5_datasets(path, handle)
            n, dim = _check_shapes(path, features.shape, None if coords is None else coords.shape)
            attrs = {
                "file": _scalar_attrs(handle.attrs.items()),
                "features": _scalar_attrs(features.attrs.items()),
            }
            if coords is not None:
                attrs["coords"] = _scalar_attrs(coords.attrs.items())
            layout = f"hdf5 features {tuple(features.shape)}" + (" with coords" if coords is not None else "")
            has_coords = coords is not None
    elif suffix in TORCH_SUFFIXES:
        content = _load_torch(path)
        features, coords, others, layout = _torch_parts(path, content)
        n, dim = _check_shapes(path, tuple(features.shape), None if coords is None else tuple(coords.shape))
        attrs = {"file": others}
        has_coords = coords is not None
        layout = f"{layout} {tuple(features.shape)}" + (" with coords" if has_coords else "")
    else:
        raise InputError(
            f"{path}: unsupported file extension {path.suffix or '(none)'!r}. Expected {LAYOUTS_EXPECTED}"
        )
    return SlideFile(
        path=path,
        source=path.relative_to(src).as_posix(),
        slide_id=slide_id,
        patient_id=patient_id,
        layout=layout,
        n_patches=n,
        feature_dim=dim,
        has_coords=has_coords,
        encoder=_declared_encoder(attrs, path),
        attrs=attrs,
    )


def read_slide_file(info: SlideFile) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a scanned slide file: ``(N, D)`` features and ``(N, 2)`` int64 coords or None.

    Raises:
        InputError: The coordinates are not finite.
    """
    if info.path.suffix.lower() in HDF5_SUFFIXES:
        with _open_hdf5(info.path) as handle:
            features_ds, coords_ds = _hdf5_datasets(info.path, handle)
            features = features_ds[()]
            coords = None if coords_ds is None else coords_ds[()]
    else:
        features, coords, _, _ = _torch_parts(info.path, _load_torch(info.path))
        features = _as_numpy(features)
        coords = None if coords is None else _as_numpy(coords)
    features = np.asarray(features).reshape(info.n_patches, info.feature_dim)
    if coords is None:
        return features, None

    coords = np.asarray(coords).reshape(info.n_patches, 2)
    if coords.dtype.kind == "f":
        if not np.isfinite(coords).all():
            raise InputError(f"{info.path}: 'coords' has NaN or infinite values; re-extract the slide")
        rounded = np.rint(coords)
        if not np.array_equal(rounded, coords):
            log.warning("%s: non-integer coordinates rounded to whole pixels", info.path)
        coords = rounded
    return features, coords.astype(np.int64)


# --- patients -----------------------------------------------------------------------


def read_slide_table(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``slide_id,patient_id`` table (CSV, TSV or parquet) into slide id -> patient.

    TCGA patient barcodes are reduced to ``TCGA-XX-XXXX``.

    Raises:
        InputError: Missing columns, empty ids or a slide id listed twice.
    """
    table = read_table(path)
    missing = [c for c in ("slide_id", "patient_id") if c not in table.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {missing} in the slide table (columns: "
            f"{list(table.columns)}); the table needs 'slide_id' and 'patient_id'"
        )
    slides = table["slide_id"].astype("string").str.strip()
    patients = table["patient_id"].astype("string").str.strip()
    empty = slides.isna() | (slides == "") | patients.isna() | (patients == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise InputError(
            f"{path}: empty slide_id or patient_id at data row {row + 1}; fill it or drop the row"
        )
    repeated = slides[slides.duplicated()]
    if not repeated.empty:
        raise InputError(
            f"{path}: slide id {repeated.iloc[0]!r} is listed more than once; keep one row per slide"
        )
    return {str(s): normalize_patient_id(str(p)) for s, p in zip(slides, patients)}


def _patient_of(path: Path, slide_id: str, patients: Mapping[str, str] | None) -> str:
    if patients is not None and slide_id in patients:
        return patients[slide_id]
    patient = normalize_patient_id(slide_id)
    if _TCGA_PATIENT.fullmatch(patient):
        return patient
    if patients is None:
        raise InputError(
            f"{path}: slide id {slide_id!r} is not a TCGA barcode, so its patient is unknown; "
            "pass --slide-table with slide_id and patient_id columns"
        )
    raise InputError(
        f"{path}: slide id {slide_id!r} is not in the slide table and is not a TCGA barcode; "
        "add a row for it to the --slide-table"
    )


# --- the store ----------------------------------------------------------------------


def open_store(
    path: str | os.PathLike[str],
    feature_dim: int,
    encoder: str,
    dtype: Literal["float16", "float32"] | None = None,
    seed: int | None = None,
) -> tuple[PatchFeatureStore, int]:
    """Open the store at ``path`` to add slides, creating it when absent.

    An existing store must match ``feature_dim`` and ``encoder``, and also ``dtype``
    and ``seed`` when they are given. A new store gets ``dtype`` (default float16)
    and ``seed`` (default 1999) as its base seed.

    Returns:
        The store (mode ``"a"``) and its base seed.

    Raises:
        InputError: The path contains something else, or a store that does not match.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (path / "zarr.json").is_file():
            raise InputError(
                f"{path} exists and is not a patch-feature store; choose a new output path"
            )
        store = PatchFeatureStore(path, mode="a")
        base_seed = store.root.attrs.get(SEED_ATTR)
        problems = []
        if store.feature_dim != feature_dim:
            problems.append(f"feature dimension {store.feature_dim}, the input {feature_dim}")
        if store.encoder != encoder:
            problems.append(f"encoder {store.encoder!r}, the input {encoder!r}")
        if dtype is not None and store.dtype != dtype:
            problems.append(f"dtype {store.dtype}, requested {dtype}")
        if seed is not None and base_seed is not None and int(base_seed) != seed:
            problems.append(f"base seed {base_seed}, requested {seed}")
        if problems:
            raise InputError(
                f"the existing store {path} does not match this conversion: it has "
                f"{'; '.join(problems)}. Convert into a new store, or pass the store's values"
            )
        if base_seed is None:
            base_seed = DEFAULT_SEED if seed is None else seed
        return store, int(base_seed)

    base_seed = DEFAULT_SEED if seed is None else seed
    store = PatchFeatureStore(
        path, mode="w", feature_dim=feature_dim, encoder=encoder, dtype=dtype or "float16"
    )
    store.root.attrs[SEED_ATTR] = int(base_seed)
    return store, base_seed


def write_slide_record(store: PatchFeatureStore, record: SlideRecord, base_seed: int) -> int:
    """Write one slide (rows permuted, ``complete`` set last) and return its patch count.

    Raises:
        InputError: The features exceed the float16 range of a float16 store, or the
            store rejects the slide (see :meth:`PatchFeatureStore.write_slide`).
    """
    features = np.asarray(record.features)
    if store.dtype == "float16" and features.size:
        finite = features[np.isfinite(features)]
        largest = float(np.abs(finite).max()) if finite.size else 0.0
        if largest > FLOAT16_MAX:
            raise InputError(
                f"slide {record.slide_id!r} ({record.source}): feature values up to {largest:g} "
                f"exceed the float16 range ({FLOAT16_MAX:g}) of the store {store.path}; convert "
                "into a new store with --dtype float32"
            )
    seed = slide_seed(base_seed, record.slide_id) if record.seed is None else int(record.seed)
    store.write_slide(
        record.slide_id,
        features,
        record.coords,
        patient_id=record.patient_id,
        seed=seed,
        source=record.source,
        attrs=record.attrs,
        overwrite=True,
    )
    return int(features.reshape(-1, features.shape[-1]).shape[0])


def _record(info: SlideFile) -> SlideRecord:
    features, coords = read_slide_file(info)
    attrs: dict[str, Any] = {"source_layout": info.layout, "has_coords": info.has_coords}
    for obj in ("file", "features", "coords"):
        for key in PROMOTED_ATTRS:
            if key in info.attrs.get(obj, {}) and key not in attrs:
                attrs[key] = info.attrs[obj][key]
    attrs["source_attrs"] = info.attrs
    return SlideRecord(info.slide_id, info.patient_id, features, coords, info.source, attrs)


# --- the conversion -----------------------------------------------------------------


def scan_slide_files(
    files: list[Path],
    src: Path,
    patients: Mapping[str, str] | None,
    skip_empty: bool,
    progress: bool = True,
) -> tuple[list[SlideFile], list[tuple[str, str]]]:
    """Pre-scan every file; raise one InputError listing all files that cannot be converted.

    Returns:
        The scanned files and ``(file, reason)`` of empty files skipped (``skip_empty``).
    """
    scanned: list[SlideFile] = []
    skipped: list[tuple[str, str]] = []
    problems: list[str] = []
    # A bar only for long lists, because the pre-scan reads shapes, not features, of HDF5 files.
    quiet = not progress or len(files) < 100
    for path in tqdm(files, desc="pre-scan", unit="file", leave=False, disable=quiet):
        try:
            scanned.append(scan_slide_file(path, src, patients))
        except EmptySlideFileError as error:
            if not skip_empty:
                problems.append(f"{error} (or pass --skip-empty to leave empty files out)")
            else:
                skipped.append((path.relative_to(src).as_posix(), str(error).split(": ", 1)[-1]))
        except InputError as error:
            problems.append(str(error))
    repeated = [sid for sid, count in Counter(s.slide_id for s in scanned).items() if count > 1]
    for slide_id in repeated:
        names = [s.source for s in scanned if s.slide_id == slide_id]
        problems.append(f"slide id {slide_id!r} comes from several files {names}; keep one")
    if problems and len({s.feature_dim for s in scanned}) > 1:
        # Report mixed dimensions now too, so that one run lists every problem.
        try:
            _common_values(scanned, encoder="any")
        except InputError as error:
            problems.append(str(error))
    if problems:
        listed = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InputError(
            f"{len(problems)} problem(s) found before writing anything:\n  {listed}{more}"
        )
    return scanned, skipped


def _common_values(scanned: list[SlideFile], encoder: str | None) -> tuple[int, str]:
    """Return the feature dimension and encoder name all files share."""
    dims = Counter(s.feature_dim for s in scanned)
    if len(dims) > 1:
        examples = ", ".join(
            f"{dim} ({count} file(s), e.g. {next(s.source for s in scanned if s.feature_dim == dim)})"
            for dim, count in dims.most_common()
        )
        raise InputError(
            f"the slide files have mixed feature dimensions: {examples}. A store contains one "
            "encoder's features; convert each encoder's files into its own store (select "
            "them with --pattern)"
        )
    declared = Counter(s.encoder for s in scanned if s.encoder is not None)
    if len(declared) > 1:
        examples = ", ".join(
            f"{name!r} ({count} file(s), e.g. {next(s.source for s in scanned if s.encoder == name)})"
            for name, count in declared.most_common()
        )
        raise InputError(
            f"the slide files declare mixed encoder names: {examples}; convert each "
            "encoder's files into its own store (select them with --pattern)"
        )
    file_encoder = next(iter(declared), None)
    if encoder is not None and file_encoder is not None and encoder != file_encoder:
        raise InputError(
            f"--encoder {encoder!r} differs from the encoder {file_encoder!r} declared by the "
            "slide files; omit --encoder to use the files' name, or check the files"
        )
    name = encoder or file_encoder
    if name is None:
        raise InputError(
            "the slide files declare no encoder name; pass --encoder NAME (for example uni2-h)"
        )
    return next(iter(dims)), name


def convert_slides(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    encoder: str | None = None,
    slide_table: str | os.PathLike[str] | None = None,
    pattern: str | None = None,
    seed: int | None = None,
    dtype: Literal["float16", "float32"] | None = None,
    skip_empty: bool = False,
    progress: bool = True,
) -> SlideConversionSummary:
    """Convert a folder of per-slide feature files into a patch-feature store.

    Empty files (0 bytes or 0 patches) are an error by default, found by the
    pre-scan: such a file usually comes from a failed download or a failed
    extraction, and converting the others would silently drop a slide from
    training. With ``skip_empty`` they are left out and listed in the summary.

    Args:
        src: Folder of slide files.
        out: Store path (``.zarr`` directory), created when absent.
        encoder: Encoder name; needed when the files declare none, and must equal
            the files' name when they declare one.
        slide_table: CSV/TSV/parquet with ``slide_id`` and ``patient_id``. Without
            it, patients come from TCGA barcodes in the slide ids.
        pattern: Glob relative to ``src``; default: the ``.h5``, ``.hdf5`` and
            ``.pt`` files directly in ``src``.
        seed: Base seed of the row permutations (default 1999, or the existing
            store's). Each slide's seed is :func:`slide_seed` of it and the slide id.
        dtype: Storage dtype of a new store (default float16).
        skip_empty: Leave empty files out instead of failing.
        progress: Show a progress bar.

    Returns:
        What was converted and skipped.

    Raises:
        InputError: A problem found by the pre-scan (nothing is written then), or a
            slide rejected while writing (slides written before stay complete).
    """
    src = Path(src)
    out = Path(out)
    files, skipped = find_slide_files(src, pattern)
    patients = read_slide_table(slide_table) if slide_table is not None else None
    scanned, empty = scan_slide_files(files, src, patients, skip_empty, progress)
    skipped += empty
    if not scanned:
        raise InputError(f"none of the {len(files)} file(s) in {src} has patches; nothing to convert")
    feature_dim, encoder_name = _common_values(scanned, encoder)

    store, base_seed = open_store(out, feature_dim, encoder_name, dtype=dtype, seed=seed)
    summary = SlideConversionSummary(out, skipped=skipped)
    todo = []
    for info in scanned:
        if not store.is_complete(info.slide_id):
            todo.append(info)
            continue
        summary.already_converted += 1
        stored = int(store.slide_attrs(info.slide_id)["n_patches"])
        if stored != info.n_patches:
            log.warning(
                "slide %r is already in %s with %d patches but %s has %d; it is kept as stored "
                "(convert into a new store to replace it)",
                info.slide_id, out, stored, info.source, info.n_patches,
            )
    known = {s.slide_id for s in scanned}
    extra = sum(1 for s in store.slides() if s.slide_id not in known)
    if extra:
        log.info("%s also contains %d slide(s) that are not among the source files", out, extra)
    if not todo:
        log.info("all %d slides already converted in %s; nothing to write", len(scanned), out)
        return summary

    log.info(
        "converting %d slide file(s) from %s into %s (%d already converted; %d-d features, "
        "encoder %r, base seed %d)",
        len(todo), src, out, summary.already_converted, feature_dim, encoder_name, base_seed,
    )
    try:
        for info in tqdm(todo, desc="convert-slides", unit="slide", disable=not progress):
            summary.patches_written += write_slide_record(store, _record(info), base_seed)
            summary.converted += 1
    except KeyboardInterrupt:
        log.warning(
            "interrupted after %d of %d slide(s); the slides written are complete, so run the "
            "same command again to convert the rest",
            summary.converted,
            len(todo),
        )
        raise
    except InputError as error:
        # The pre-scan reads shapes only, so bad values surface here, one slide at a time.
        raise InputError(
            f"{error}\nNothing of that slide was written. The {summary.converted} of "
            f"{len(todo)} slide(s) written before it are complete in {out}, and running the "
            "command again skips them"
        ) from error
    return summary
