"""Torch datasets that serve one patient per item, and the padding collate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.feature_store import PatchFeatureStore
from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError


#: Integer view and exponent mask of each float type: a value is NaN or infinite
#: exactly when all its exponent bits are set.
EXPONENT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
}


def all_finite(values: np.ndarray) -> bool:
    """Return whether no value is NaN or infinite.

    Checks the exponent bits of float16 and float32 arrays, which is more than ten
    times faster than ``np.isfinite`` on float16 (numpy computes float16 elementwise).
    """
    bits = EXPONENT_BITS.get(values.dtype)
    if bits is None or not values.flags.c_contiguous:
        return bool(np.isfinite(values).all())
    view, mask = bits
    return not bool(((values.view(view) & mask) == mask).any())


class RowsOf:
    """Rows ``index`` of a ``(patients, features)`` tensor, looked up on access.

    A split's dataset reads its patients' omics through this view instead of
    holding a copy, so memory does not grow with each split of a large cohort.
    """

    def __init__(self, values: torch.Tensor, index: np.ndarray) -> None:
        self.values = values
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> torch.Tensor:
        return self.values[int(self.index[position])]


class PatientBags(Dataset):
    """Patch bags and omics vectors of a list of patients.

    Args:
        store: Patch-feature store (opened lazily in each worker process).
        patients: Patient ids, one item each.
        slides: For each patient, ``(slide_id, n_patches)`` of every slide; the
            patient's bag is the concatenation of its slides.
        omics: Modality name to a ``(len(patients), F_m)`` float32 tensor (or a
            :class:`RowsOf` view), NaN for missing values.
        present: Modality name to a ``(len(patients),)`` bool tensor.
        n_patches: Patches drawn per patient (uniformly, with replacement when the
            patient has fewer); None serves every patch.
        max_patches: With ``n_patches=None``, keep at most this many patches per
            slide (the first rows, a random subset thanks to the stored permutation).
        extra: Further per-patient tensors to put in each item (labels), by key.
    """

    def __init__(
        self,
        store: PatchFeatureStore,
        patients: Sequence[str],
        slides: Sequence[Sequence[tuple[str, int]]],
        omics: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        n_patches: int | None,
        max_patches: int | None = None,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.store = store
        self.patients = list(patients)
        self.slides = [list(s) for s in slides]
        self.omics = dict(omics)
        self.present = dict(present)
        self.n_patches = n_patches
        self.max_patches = max_patches
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return len(self.patients)

    def _sample(
        self, slides: list[tuple[str, int]], generator: torch.Generator | None = None
    ) -> np.ndarray:
        """Draw ``n_patches`` rows across the slides, one contiguous read per slide."""
        sizes = np.array([n for _, n in slides], dtype=np.int64)
        if len(slides) == 1:
            counts = np.array([self.n_patches])
        else:
            draw = torch.multinomial(
                torch.as_tensor(sizes, dtype=torch.float64),
                self.n_patches,
                replacement=True,
                generator=generator,
            )
            counts = np.bincount(draw.numpy(), minlength=len(slides))

        parts = []
        for (slide_id, n), k in zip(slides, counts):
            if k == 0:
                continue
            if k <= n:
                start = int(torch.randint(0, n - k + 1, (), generator=generator).item())
                parts.append(self.store.read_rows(slide_id, start, start + int(k)))
            else:
                rows = self.store.read_rows(slide_id, 0, n)
                parts.append(rows[torch.randint(0, n, (int(k),), generator=generator).numpy()])
        return np.concatenate(parts)

    def _all(self, slides: list[tuple[str, int]]) -> np.ndarray:
        parts = []
        for slide_id, n in slides:
            stop = n if self.max_patches is None else min(n, self.max_patches)
            parts.append(self.store.read_rows(slide_id, 0, stop))
        return np.concatenate(parts)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Serve one patient: ``key`` is its position, or ``(position, seed)`` to draw
        its patches from ``seed`` (see :class:`~morpheus_pl.seeding.EpochShuffle`)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        patient = self.patients[index]
        slides = self.slides[index]
        if self.n_patches is None:
            patches = self._all(slides)
        else:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            patches = self._sample(slides, generator)
        if not all_finite(patches):
            raise InputError(
                f"patient {patient!r}: NaN or infinite patch features in slide(s) "
                f"{[s for s, _ in slides]} of {self.store.path}; re-extract those slides"
            )
        item = {
            keys.PATIENT_ID: patient,
            keys.PATCHES: torch.from_numpy(np.ascontiguousarray(patches)),
            keys.OMICS: {m: v[index] for m, v in self.omics.items()},
            keys.OMICS_PRESENT: {m: v[index] for m, v in self.present.items()},
        }
        item.update({k: v[index] for k, v in self.extra.items()})
        return item


def collate_bags(items: Sequence[dict]) -> dict:
    """Stack items into a batch, padding bags to the longest with a patch mask."""
    longest = max(item[keys.PATCHES].shape[0] for item in items)
    dim = items[0][keys.PATCHES].shape[1]
    patches = items[0][keys.PATCHES].new_zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item[keys.PATCHES].shape[0]
        patches[i, :n] = item[keys.PATCHES]
        mask[i, :n] = True

    batch = {
        keys.PATIENT_ID: [item[keys.PATIENT_ID] for item in items],
        keys.PATCHES: patches,
        keys.PATCH_MASK: mask,
        keys.OMICS: {m: torch.stack([it[keys.OMICS][m] for it in items]) for m in items[0][keys.OMICS]},
        keys.OMICS_PRESENT: {
            m: torch.stack([it[keys.OMICS_PRESENT][m] for it in items])
            for m in items[0][keys.OMICS_PRESENT]
        },
    }
    standard = {keys.PATIENT_ID, keys.PATCHES, keys.OMICS, keys.OMICS_PRESENT}
    for key in items[0]:
        if key not in standard:
            batch[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    return batch
