"""Model FLOPs per training step against the machine's measured matmul rate."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from morpheus_pl.benchmarks.common import machine, median, median_seconds, reference_groups
from morpheus_pl.benchmarks.step import make_batch
from morpheus_pl.nn import Morpheus


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """Return the float32 matmul rate in FLOP/s, from ``(size, size) @ (size, size)``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median(median_seconds(lambda: a @ b, repeats))
    return 2 * size**3 / seconds


def run(batch: int = 32, patches: int = 1024, dim: int = 1536, repeats: int = 3) -> dict:
    """Count the FLOPs of one forward and backward pass and time the real step."""
    groups = reference_groups()
    n_features = {m: 1 + max(max(g) for g in members) for m, members in groups.items()}
    torch.manual_seed(0)
    model = Morpheus(dim, groups, n_features).train()
    data = make_batch(groups, batch, patches, dim)

    def step() -> None:
        out = model.forward_pretrain(data["patches"], data["mask"], data["omics"], data["present"], 0.75)
        out.loss.backward()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = median(median_seconds(step, repeats))
    rate = matmul_rate()
    return {
        "batch": batch,
        "flops_per_step": flops,
        "step_seconds": seconds,
        "matmul_flops_per_second": rate,
        "ideal_step_seconds": flops / rate,
        "utilisation": flops / rate / seconds,
        "machine": machine(),
    }


if __name__ == "__main__":
    import json

    start = time.time()
    print(json.dumps(run(), indent=2))
