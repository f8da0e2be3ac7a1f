"""Helpers shared by the benchmark scripts: timing, machine description, group sizes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from data_modules.groupings import bundled_hallmark_gmt, read_gmt


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Run ``function`` ``warmup`` times, then time ``repeats`` runs; return the times."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """Describe the machine in one line: CPU, core count, torch build and GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def reference_groups() -> dict[str, list[list[int]]]:
    """Three modalities of 50 groups sized like the reference model's inputs.

    RNA: the 50 Hallmark gene sets (7,010 memberships of 4,168 genes, overlapping).
    DNAm: 50 contiguous chunks of 7,150 CpGs. CNV: 50 contiguous chunks of 6,750 genes.
    """
    sets = read_gmt(bundled_hallmark_gmt())
    genes = sorted({g for members in sets.values() for g in members})
    position = {g: i for i, g in enumerate(genes)}
    rna = [[position[g] for g in members] for members in sets.values()]

    def chunks(n: int) -> list[list[int]]:
        bounds = [round(i * n / 50) for i in range(51)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(50)]

    return {"rna": rna, "dnam": chunks(7150), "cnv": chunks(6750)}
