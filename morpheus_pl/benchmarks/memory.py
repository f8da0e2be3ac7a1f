"""Peak resident memory of a short pre-training run at two cohort sizes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from morpheus_pl.benchmarks.common import machine

#: Feature counts of the three modalities, as in the reference model's inputs.
FEATURES = {"rna": 4168, "dnam": 7150, "cnv": 6750}

TRAIN = """
import json, sys
from lightning.pytorch import Trainer, seed_everything
from data_modules import Chunks, MorpheusDataModule, OmicsModality, RandomSplit
from morpheus_pl import MaskedOmicsPretraining

root = sys.argv[1]
seed_everything(0)
modalities = {m: OmicsModality(f"{root}/{m}.h5ad", Chunks(50)) for m in %(features)r}
data = MorpheusDataModule(f"{root}/cohort.csv", f"{root}/features.zarr", modalities=modalities,
                          split=RandomSplit(0.1), n_patches=128, batch_size=32, num_workers=0)
model = MaskedOmicsPretraining(data.feature_dim, data.modality_specs)
trainer = Trainer(max_steps=int(sys.argv[2]), limit_val_batches=2, num_sanity_val_steps=0,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu")
trainer.fit(model, data)
# VmHWM is this process's own peak; ru_maxrss would start from the parent's at fork.
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": peak_kb / 1024}))
"""


def peak_rss(root: Path, steps: int) -> float:
    """Run the training script on the cohort in ``root``; return its peak RSS in MiB."""
    script = TRAIN % {"features": FEATURES}
    result = subprocess.run(
        [sys.executable, "-c", script, str(root), str(steps)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"training failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run(small: int = 200, large: int = 2000, steps: int = 20, root: str | None = None) -> dict:
    """Write two synthetic cohorts and compare the peak memory of the same short run."""
    from data_modules.synthetic import write_synthetic_cohort

    folder = Path(tempfile.mkdtemp(prefix="morpheus-memory-", dir=root))
    try:
        peaks = {}
        for n in (small, large):
            cohort = write_synthetic_cohort(
                folder / str(n), n_patients=n, patch_dim=1536, patches=(64, 128),
                features=FEATURES, slides_per_patient=(1, 1), seed=n,
            )
            peaks[n] = peak_rss(cohort.root, steps)
        return {
            "patients": [small, large],
            "peak_rss_mb": [peaks[small], peaks[large]],
            "growth": peaks[large] / peaks[small] - 1.0,
            "steps": steps,
            "machine": machine(),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
