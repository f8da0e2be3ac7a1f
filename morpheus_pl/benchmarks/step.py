"""Training-step throughput of MORPHEUS against a naive formulation of the same maths."""

from __future__ import annotations

import torch

from morpheus_pl.benchmarks.common import machine, median, median_seconds, reference_groups
from morpheus_pl.benchmarks.naive import naive_copy
from morpheus_pl.nn import Morpheus


def make_batch(groups, batch: int, patches: int, dim: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    n_features = {m: 1 + max(max(g) for g in members) for m, members in groups.items()}
    return {
        "patches": torch.randn(batch, patches, dim, generator=generator),
        "mask": torch.ones(batch, patches, dtype=torch.bool),
        "omics": {m: torch.randn(batch, n, generator=generator) for m, n in n_features.items()},
        "present": {m: torch.ones(batch, dtype=torch.bool) for m in groups},
    }


def run(batch: int = 32, patches: int = 1024, dim: int = 1536, repeats: int = 5) -> dict:
    """Time forward, backward and an AdamW step of both models; compare their outputs."""
    groups = reference_groups()
    n_features = {m: 1 + max(max(g) for g in members) for m, members in groups.items()}
    torch.manual_seed(0)
    fast = Morpheus(dim, groups, n_features)
    naive = naive_copy(fast)
    data = make_batch(groups, batch, patches, dim)

    # Outputs with shared weights, without dropout and on the same masks.
    results = []
    for model in (fast.eval(), naive.eval()):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(1)
            results.append(model.forward_pretrain(data["patches"], data["mask"], data["omics"], data["present"], 0.75, generator))
    difference = max(
        (results[0].predictions[m] - results[1].predictions[m]).abs().max().item() for m in groups
    )
    difference = max(difference, (results[0].embedding - results[1].embedding).abs().max().item())

    timings = {}
    for name, model in (("fast", fast.train()), ("naive", naive.train())):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            out = model.forward_pretrain(data["patches"], data["mask"], data["omics"], data["present"], 0.75)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()

        timings[name] = median_seconds(step, repeats)
    fast_time, naive_time = median(timings["fast"]), median(timings["naive"])
    return {
        "batch": batch,
        "patches": patches,
        "dim": dim,
        "fast_seconds": fast_time,
        "naive_seconds": naive_time,
        "fast_samples_per_second": batch / fast_time,
        "naive_samples_per_second": batch / naive_time,
        "speedup": naive_time / fast_time,
        "max_output_difference": difference,
        "repeats": repeats,
        "machine": machine(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
