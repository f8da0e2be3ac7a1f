"""GPU benchmark: bf16 against fp32 step throughput, and data wait against compute.

Run on a CUDA machine: ``python -m morpheus_pl.benchmarks.gpu``. It prints one JSON
object; ``python -m morpheus_pl.benchmarks --gpu`` also puts it in the benchmark page.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from morpheus_pl.benchmarks.common import machine, median, reference_groups
from morpheus_pl.benchmarks.step import make_batch
from morpheus_pl.nn import Morpheus


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_throughput(
    precision: str, batch: int, patches: int, dim: int, steps: int, device: str = "cuda"
) -> float:
    """Return training samples per second at ``precision`` (``fp32`` or ``bf16``)."""
    where = torch.device(device)
    groups = reference_groups()
    n_features = {m: 1 + max(max(g) for g in members) for m, members in groups.items()}
    torch.manual_seed(0)
    model = Morpheus(dim, groups, n_features).to(where).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    data = make_batch(groups, batch, patches, dim)
    data = {
        "patches": data["patches"].to(where),
        "mask": data["mask"].to(where),
        "omics": {m: v.to(where) for m, v in data["omics"].items()},
        "present": {m: v.to(where) for m, v in data["present"].items()},
    }
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    times = []
    for i in range(steps + 3):
        synchronize(where)
        start = time.perf_counter()
        with torch.autocast(where.type, dtype=dtype, enabled=precision == "bf16"):
            out = model.forward_pretrain(data["patches"], data["mask"], data["omics"], data["present"], 0.75)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        synchronize(where)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return batch / median(times)


def data_wait_split(
    patients: int,
    steps: int,
    num_workers: int,
    device: str = "cuda",
    patches: tuple[int, int] = (1024, 2048),
    draw: int = 1024,
) -> dict:
    """Fit on a synthetic cohort and split each step into waiting for data and compute."""
    where = torch.device(device)
    import lightning.pytorch as pl

    from data_modules import Chunks, MorpheusDataModule, OmicsModality, RandomSplit
    from data_modules.synthetic import write_synthetic_cohort
    from morpheus_pl import MaskedOmicsPretraining

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.wait, self.compute, self.last_end = [], [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            synchronize(where)
            self.start = time.perf_counter()
            if self.last_end is not None:
                self.wait.append(self.start - self.last_end)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            synchronize(where)
            self.last_end = time.perf_counter()
            self.compute.append(self.last_end - self.start)

    folder = Path(tempfile.mkdtemp(prefix="morpheus-gpu-"))
    try:
        features = {"rna": 4168, "dnam": 7150, "cnv": 6750}
        cohort = write_synthetic_cohort(
            folder, n_patients=patients, patch_dim=1536, patches=patches,
            features=features, slides_per_patient=(1, 1),
        )
        modalities = {m: OmicsModality(str(cohort.omics[m]), Chunks(50)) for m in features}
        data = MorpheusDataModule(
            str(cohort.cohort), str(cohort.store), modalities=modalities, split=RandomSplit(0.05),
            n_patches=draw, batch_size=32, num_workers=num_workers,
        )
        model = MaskedOmicsPretraining(data.feature_dim, data.modality_specs)
        timer = Timer()
        trainer = pl.Trainer(
            max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, accelerator=where.type, devices=1, precision="bf16-mixed",
            callbacks=[timer],
        )
        trainer.fit(model, data)
        wait, compute = median(timer.wait[2:]), median(timer.compute[2:])
        return {"data_wait_seconds": wait, "compute_seconds": compute, "num_workers": num_workers}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(batch: int = 32, patches: int = 1024, dim: int = 1536, steps: int = 20) -> dict:
    """Measure both; raises ``RuntimeError`` without a CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU benchmark needs a CUDA device")
    fp32 = step_throughput("fp32", batch, patches, dim, steps)
    bf16 = step_throughput("bf16", batch, patches, dim, steps)
    tokens = 1 + 16 + 37  # global, slide and visible omics tokens per sample at mask ratio 0.75
    return {
        "fp32_samples_per_second": fp32,
        "bf16_samples_per_second": bf16,
        "bf16_speedup": bf16 / fp32,
        "bf16_encoder_tokens_per_second": bf16 * tokens,
        "fp32_encoder_tokens_per_second": fp32 * tokens,
        "loader": data_wait_split(patients=320, steps=40, num_workers=8),
        "machine": machine(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
