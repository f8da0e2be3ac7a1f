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


def training_step(model: Morpheus, data: dict, optimizer: torch.optim.Optimizer | None):
    """Return a function running forward, backward and (with ``optimizer``) an update."""

    def step() -> None:
        out = model.forward_pretrain(data["patches"], data["mask"], data["omics"], data["present"], 0.75)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()

    return step


def part_timings(model: Morpheus, data: dict, repeats: int) -> dict[str, float]:
    """Median forward+backward seconds of the parts that the two formulations write differently."""
    groups = list(model.modalities)
    width = model.decoders[groups[0]].norm.normalized_shape[0]
    queries = torch.randn(data["patches"].shape[0], len(model.tokenizers[groups[0]].index.sizes), width, requires_grad=True)

    def slide() -> None:
        model.zero_grad(set_to_none=True)
        model.slide_tokenizer(data["patches"], data["mask"]).sum().backward()

    def tokenizers() -> None:
        model.zero_grad(set_to_none=True)
        sum(model.tokenizers[m](data["omics"][m]).sum() for m in groups).backward()

    def heads() -> None:
        model.zero_grad(set_to_none=True)
        sum(model.decoders[m].head(queries).sum() for m in groups).backward()

    return {
        name: median(median_seconds(function, repeats))
        for name, function in (("slide", slide), ("tokenizers", tokenizers), ("heads", heads))
    }


def run(batch: int = 32, patches: int = 1024, dim: int = 1536, repeats: int = 7, compiled: bool = False) -> dict:
    """Time training steps of both models and compare their outputs.

    Both sides use the optimiser the product configures (AdamW with the fused kernel).
    With ``compiled``, the product's model is also timed with ``torch.compile`` on
    (``Morpheus.compile_parts``); its compilation time is reported separately.
    """
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

    # The two sides take turns, step by step, so that drifts of the machine's speed
    # (other load, clock changes) fall on both alike.
    steps = {}
    for name, model in (("fast", fast.train()), ("naive", naive.train())):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        steps[name] = training_step(model, data, optimizer)
        steps[f"{name}_forward_backward"] = training_step(model, data, None)
    times = {name: [] for name in steps}
    for name, function in steps.items():
        median_seconds(function, 0, warmup=2)
    for _ in range(repeats):
        for name, function in steps.items():
            times[name] += median_seconds(function, 1, warmup=0)
    timings = {name: median(values) for name, values in times.items()}
    parts = {"fast": part_timings(fast, data, repeats), "naive": part_timings(naive, data, repeats)}

    out = {
        "batch": batch,
        "patches": patches,
        "dim": dim,
        "fast_seconds": timings["fast"],
        "naive_seconds": timings["naive"],
        "fast_samples_per_second": batch / timings["fast"],
        "naive_samples_per_second": batch / timings["naive"],
        "speedup": timings["naive"] / timings["fast"],
        "forward_backward_speedup": timings["naive_forward_backward"] / timings["fast_forward_backward"],
        "parts": parts,
        "max_output_difference": difference,
        "repeats": repeats,
        "machine": machine(),
    }
    if compiled:
        out.update(compiled_timings(fast, data, repeats))
    return out


def compiled_timings(model: Morpheus, data: dict, repeats: int) -> dict[str, float]:
    """Compile ``model``'s parts in an empty cache; time the compilation and the steps."""
    import os
    import shutil
    import tempfile
    import time

    # An empty inductor cache, so that the compile time is the first-run cost.
    cache = tempfile.mkdtemp(prefix="morpheus-inductor-")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model.compile_parts()
        step = training_step(model, data, optimizer)
        start = time.perf_counter()
        for _ in range(3):  # compiles, then settles the dynamic-shape variants
            step()
        compile_seconds = time.perf_counter() - start
        return {"compile_seconds": compile_seconds, "compiled_seconds": median(median_seconds(step, repeats))}
    finally:
        if previous is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
