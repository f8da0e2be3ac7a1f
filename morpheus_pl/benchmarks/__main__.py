"""``python -m morpheus_pl.benchmarks``: run the benchmarks and write ``docs/benchmarks.md``."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path

import torch

from morpheus_pl.benchmarks import flops, gpu, loader, memory, step
from morpheus_pl.benchmarks.common import machine
from morpheus_pl.protocols import git_revision

log = logging.getLogger("morpheus_pl.benchmarks")


def shared_bound(s: dict) -> list[str]:
    """Explain how far the step ratio can go while the shared blocks keep their cost."""
    rewritten = sum(s["parts"]["fast"].values())
    shared = s["fast_seconds"] - rewritten
    if shared <= 0:
        return []
    return [
        "Everything else in the product's step (the encoder and decoder blocks, the loss and",
        f"the optimiser, the same code on both sides) takes about {shared:.2f} s. Even if the",
        "three rewritten parts took no time at all, the ratio could not exceed",
        f"{s['naive_seconds'] / shared:.1f}x on this machine. On a GPU the naive side also pays",
        "one kernel launch per group and layer, which this CPU measurement does not show.",
        "",
    ]


def page(results: dict, command: str) -> str:
    s, l, m, f = results["step"], results["loader"], results["memory"], results["flops"]
    lines = [
        "# Benchmarks",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- git revision: `{git_revision()}`",
        "",
        "Each figure is the median of several runs, and each ratio compares two",
        "formulations measured side by side in the same process.",
        "",
        *(
            [
                "**Quick mode**: small sizes that only check that the scripts run. These",
                "figures say nothing about the targets; run without `--quick` to measure.",
                "",
            ]
            if "--quick" in command
            else []
        ),
        "## Training step",
        "",
        f"Batch {s['batch']}, {s['patches']} patches of {s['dim']} dimensions, three omics",
        "modalities of 50 groups (RNA: the 50 Hallmark sets, 7,010 memberships; DNAm: 7,150",
        "CpGs; CNV: 6,750 genes). One step is forward, backward and an AdamW update (the fused",
        "kernel the product configures, on both sides). The naive formulation",
        "(`morpheus_pl/benchmarks/naive.py`) materialises keys and values and runs one",
        "Python-level module per group, with weights copied from the fast model; the encoder",
        "and decoder blocks are the same code on both sides.",
        "",
        "| formulation | seconds per step | samples per second |",
        "| --- | --- | --- |",
        f"| MORPHEUS (`morpheus_pl.nn`) | {s['fast_seconds']:.3f} | {s['fast_samples_per_second']:.1f} |",
        f"| naive | {s['naive_seconds']:.3f} | {s['naive_samples_per_second']:.1f} |",
        *(
            [f"| MORPHEUS with `torch_compile: true` | {s['compiled_seconds']:.3f} | {s['batch'] / s['compiled_seconds']:.1f} |"]
            if "compiled_seconds" in s else []
        ),
        "",
        f"Speed-up: **{s['speedup']:.2f}x** (target: at least 5x); forward and backward alone:",
        f"{s['forward_backward_speedup']:.2f}x. Largest output difference with shared weights:",
        f"{s['max_output_difference']:.1e} (target: at most 1e-4). Median of {s['repeats']} steps, the",
        "two sides taking turns step by step after two warm-up steps each.",
        *(
            ["", f"`torch.compile` took {s['compile_seconds']:.0f} s (three steps, empty cache) before its timed steps."]
            if "compile_seconds" in s else []
        ),
        "",
        "The parts that the two formulations write differently, forward and backward, seconds:",
        "",
        "| part | MORPHEUS | naive | ratio |",
        "| --- | --- | --- | --- |",
        *[
            f"| {name} | {s['parts']['fast'][name]:.3f} | {s['parts']['naive'][name]:.3f} | "
            f"{s['parts']['naive'][name] / s['parts']['fast'][name]:.1f}x |"
            for name in ("slide", "tokenizers", "heads")
        ],
        "",
        *shared_bound(s),
        "## Loader",
        "",
        f"{l['samples']} bags of {l['draw']} patches drawn from {l['slides']} slides of",
        f"{l['patches_per_slide']:,} float16 patches of {l['dim']} dimensions, warm page cache.",
        "The training dataset reads one contiguous window of the shuffled rows per bag; the",
        "baseline reads each slide's whole feature matrix from an HDF5 file and samples from",
        "it. Bytes read are the process's",
        "`rchar` counter (bytes passed through read calls, cache hits included).",
        "",
        "| reader | samples per second | bytes read per sample / bytes delivered |",
        "| --- | --- | --- |",
        f"| store (`PatientBags`, the training dataset) | {l['store']['samples_per_second']:.1f} | {l['store_read_amplification']:.2f} |",
        f"| whole-slide HDF5 | {l['hdf5']['samples_per_second']:.1f} | {l['hdf5_read_amplification']:.2f} |",
        "",
        f"Speed-up: **{l['speedup']:.1f}x** (target: at least 5x); store read amplification",
        f"{l['store_read_amplification']:.2f} (target: at most 1.5).",
        "",
        "## Memory",
        "",
        f"Peak resident memory of the same {m['steps']}-step pre-training run (batch 32, 128",
        "patches of 1536 dimensions, RNA 4,168 + DNAm 7,150 + CNV 6,750 features, no",
        "DataLoader workers) on synthetic cohorts of two sizes:",
        "",
        "| patients | peak RSS (MiB) |",
        "| --- | --- |",
        *[f"| {n:,} | {r:.0f} |" for n, r in zip(m["patients"], m["peak_rss_mb"])],
        "",
        f"Growth: **{100 * m['growth']:.1f}%** (target: at most 10%).",
        "",
        "## FLOPs against the matmul rate",
        "",
        f"One forward and backward pass at batch {f['batch']} counts {f['flops_per_step'] / 1e9:.1f} GFLOP",
        f"(`torch.utils.flop_counter`). The machine multiplies float32 matrices at",
        f"{f['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s (2048 x 2048), so the step would take",
        f"{f['ideal_step_seconds']:.2f} s at that rate; it takes {f['step_seconds']:.2f} s",
        f"({100 * f['utilisation']:.0f}% of the matmul rate).",
        "",
        "## GPU",
        "",
    ]
    if results.get("gpu"):
        g = results["gpu"]
        lines += [
            "| precision | samples per second | encoder tokens per second |",
            "| --- | --- | --- |",
            f"| fp32 | {g['fp32_samples_per_second']:.1f} | {g['fp32_encoder_tokens_per_second']:.0f} |",
            f"| bf16-mixed | {g['bf16_samples_per_second']:.1f} | {g['bf16_encoder_tokens_per_second']:.0f} |",
            "",
            f"Step time split (bf16, {g['loader']['num_workers']} workers): data wait "
            f"{g['loader']['data_wait_seconds'] * 1000:.1f} ms, compute {g['loader']['compute_seconds'] * 1000:.1f} ms.",
        ]
    else:
        lines += [
            "Not measured: this run had no CUDA device. On a GPU machine run",
            "`python -m morpheus_pl.benchmarks.gpu` (bf16 against fp32 step throughput, and the",
            "step time split into data wait and compute), or `make bench` to refresh this page.",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m morpheus_pl.benchmarks", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="page to write")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures as JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that the scripts run")
    parser.add_argument("--compile", action="store_true", help="also time the step with torch.compile")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    quick = options.quick
    results = {}
    log.info("training step")
    results["step"] = step.run(
        **({"batch": 4, "patches": 128, "dim": 256, "repeats": 2} if quick else {}),
        compiled=options.compile,
    )
    log.info("loader")
    results["loader"] = loader.run(**({"slides": 3, "patches_per_slide": 4000, "dim": 256, "samples": 20} if quick else {}))
    log.info("memory")
    results["memory"] = memory.run(**({"small": 20, "large": 60, "steps": 2} if quick else {}))
    log.info("flops")
    results["flops"] = flops.run(**({"batch": 4, "patches": 128, "dim": 256} if quick else {}))
    if torch.cuda.is_available():
        log.info("gpu")
        results["gpu"] = gpu.run()
    command = "python -m morpheus_pl.benchmarks"
    if quick:
        command += " --quick"
    if options.compile:
        command += " --compile"
    options.out.write_text(page(results, command))
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    log.info("wrote %s", options.out)


if __name__ == "__main__":
    main()
