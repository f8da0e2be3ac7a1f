"""Reconstruction report: how well each omics modality is rebuilt from each input subset.

``python -m morpheus_pl report --config <data config> --ckpt_path <pre-training ckpt>``
reconstructs every target modality from the slide alone, the slide plus each other
modality, and the slide plus all other modalities. Each row gives the median and
interquartile range over features of the per-feature Pearson and Spearman r between
reconstruction and measurement. It gives them over all features and over features
whose standard deviation exceeds a threshold. Beside them stands a baseline fitted on
the training split from the same inputs: ridge regression from the input omics, or the
training mean when the slide is the only input (whose r is undefined).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.protocols import git_revision, markdown_table, read_config

log = logging.getLogger(__name__)


@dataclass
class Pass:
    """Scaled reconstructions of one input subset, with the measured values."""

    inputs: tuple[str, ...]
    reconstructions: dict[str, np.ndarray]


def per_feature_r(prediction: np.ndarray, truth: np.ndarray, method: str) -> np.ndarray:
    """Correlation between columns of ``prediction`` and ``truth``, ignoring NaN pairs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = pd.DataFrame(prediction)
        return frame.corrwith(pd.DataFrame(truth), axis=0, method=method).to_numpy()


def summary(values: np.ndarray) -> tuple[float, float, float]:
    """Median, first and third quartile of the finite values (NaN if none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), float("nan")
    q1, median, q3 = np.quantile(finite, [0.25, 0.5, 0.75])
    return float(median), float(q1), float(q3)


def input_subsets(modalities: list[str], target: str) -> list[tuple[str, ...]]:
    """Slide only, slide plus each other modality, slide plus all other modalities."""
    others = [m for m in modalities if m != target]
    subsets: list[tuple[str, ...]] = [()]
    subsets += [(m,) for m in others]
    if len(others) > 1:
        subsets.append(tuple(others))
    return subsets


def collect(model: Any, loader: Any, inputs: tuple[str, ...], targets: list[str]) -> dict[str, np.ndarray]:
    """Reconstruct ``targets`` from the slide and ``inputs`` for every patient of a loader."""
    from morpheus_pl.reconstruction import predict

    parts: dict[str, list[np.ndarray]] = {m: [] for m in targets}
    for batch in loader:
        out = predict(
            model,
            batch[keys.PATCHES],
            batch.get(keys.PATCH_MASK),
            batch[keys.OMICS],
            batch[keys.OMICS_PRESENT],
            list(inputs),
            targets,
        )
        for m in targets:
            parts[m].append(out.reconstructions[m].float().numpy())
    return {m: np.concatenate(v) for m, v in parts.items()}


def ridge_baseline(
    train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Ridge regression fitted on the training split (NaN set to 0, the training mean)."""
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=alphas).fit(np.nan_to_num(train_x), np.nan_to_num(train_y))
    return model.predict(np.nan_to_num(eval_x))


def main(argv: list[str]) -> None:
    """Entry point of ``python -m morpheus_pl report``."""
    parser = argparse.ArgumentParser(
        prog="python -m morpheus_pl report",
        description="Reconstruction report of a pre-training checkpoint (per-feature Pearson and "
        "Spearman r for every target modality and input subset, with baselines).",
    )
    parser.add_argument("-c", "--config", required=True, help="config whose data section describes the cohort")
    parser.add_argument("--ckpt_path", required=True, help="pre-training checkpoint")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="patients to evaluate (default test)")
    parser.add_argument("--std-threshold", type=float, default=0.15, help="second summary over features whose measured standard deviation exceeds this (default 0.15, in the file's units)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/report/<config>-<time>)")
    parser.add_argument("--batch-size", type=int, default=32, help="patients per batch")
    options = parser.parse_args(argv[1:])

    from morpheus_pl.pretraining import MaskedOmicsPretraining

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = options.out or Path("runs") / "report" / f"{Path(options.config).stem}-{stamp}"
    command = shlex.join(["python", "-m", "morpheus_pl", *argv])

    datamodule = build_datamodule(options.config, options.ckpt_path)
    model = MaskedOmicsPretraining.load_from_checkpoint(options.ckpt_path, map_location="cpu").eval()
    network = model.model
    modalities = list(network.modalities)
    data = datamodule.data
    index = data.indices(options.split)
    if len(index) == 0:
        raise InputError(f"the {options.split} split is empty; choose another with --split")
    loader = datamodule.split_dataloader(options.split, batch_size=options.batch_size)
    train = data.indices("train")

    passes = {}
    subsets = sorted({s for t in modalities for s in input_subsets(modalities, t)}, key=lambda s: (len(s), s))
    for inputs in subsets:
        targets = [m for m in modalities if m not in inputs]
        log.info("reconstructing %s from slide%s", targets, "".join(f" + {m}" for m in inputs))
        passes[inputs] = collect(network, loader, inputs, targets)

    rows, per_feature = [], {}
    for target in modalities:
        scaled_truth = data.modalities[target].values[index].numpy()
        has = data.modalities[target].present[index].numpy()
        scaling = data.modalities[target].scaling
        unscale = (lambda v: v * scaling.scale + scaling.mean) if scaling is not None else (lambda v: v)
        truth = unscale(scaled_truth)[has]
        std = np.nanstd(truth, axis=0)
        variable = std > options.std_threshold
        for inputs in input_subsets(modalities, target):
            reconstruction = passes[inputs][target][has]
            r = per_feature_r(unscale(reconstruction), truth, "pearson")
            rho = per_feature_r(unscale(reconstruction), truth, "spearman")
            baseline = baseline_prediction(data, target, inputs, train, index[has])
            base_r = per_feature_r(unscale(baseline), truth, "pearson")
            base_rho = per_feature_r(unscale(baseline), truth, "spearman")
            label = " + ".join(["slide", *inputs])
            per_feature[(target, label)] = (r, base_r)
            row = {"target": target, "inputs": label, "patients": int(has.sum()), "features": int(len(r))}
            row.update(stats("pearson", r, variable))
            row.update(stats("spearman", rho, variable))
            row["mae"] = float(np.nanmean(np.abs(reconstruction - scaled_truth[has])))
            row.update(stats("baseline_pearson", base_r, variable))
            row.update(stats("baseline_spearman", base_rho, variable))
            row["baseline_mae"] = float(np.nanmean(np.abs(baseline - scaled_truth[has])))
            row["features_std_above_threshold"] = int(variable.sum())
            rows.append(row)

    table = pd.DataFrame(rows)
    write_report(table, out, options, command)
    write_figures(per_feature, passes, data, index, modalities, out)
    log.info("reconstruction report written to %s\n%s", out, compact(table).to_string(index=False))


def stats(name: str, values: np.ndarray, variable: np.ndarray) -> dict[str, float]:
    """Median and quartiles over all features and over the variable ones."""
    median, q1, q3 = summary(values)
    v_median, v_q1, v_q3 = summary(values[variable])
    return {
        f"{name}_median": median,
        f"{name}_q1": q1,
        f"{name}_q3": q3,
        f"{name}_median_variable": v_median,
        f"{name}_q1_variable": v_q1,
        f"{name}_q3_variable": v_q3,
    }


def baseline_prediction(data: Any, target: str, inputs: tuple[str, ...], train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Scaled baseline reconstruction of ``target`` for ``rows`` from the same inputs."""
    values = data.modalities[target].values.numpy()
    train_rows = train[data.modalities[target].present.numpy()[train]]
    mean = np.nanmean(values[train_rows], axis=0)
    if not inputs:
        return np.broadcast_to(mean, (len(rows), values.shape[1])).copy()
    features = np.concatenate([data.modalities[m].values.numpy() for m in inputs], axis=1)
    train_y = values[train_rows] - mean
    prediction = ridge_baseline(features[train_rows], train_y, features[rows], np.logspace(-1, 5, 13))
    return prediction + mean


def cell(median: float, q1: float, q3: float) -> str:
    if np.isnan(median):
        return "n/a"
    return f"{median:.3f} [{q1:.3f}, {q3:.3f}]"


def compact(table: pd.DataFrame) -> pd.DataFrame:
    """Format the table for reading: median [Q1, Q3] per metric, model beside baseline."""
    rows = []
    for _, r in table.iterrows():
        rows.append(
            {
                "target": r["target"],
                "inputs": r["inputs"],
                "Pearson r": cell(r["pearson_median"], r["pearson_q1"], r["pearson_q3"]),
                "baseline Pearson r": cell(r["baseline_pearson_median"], r["baseline_pearson_q1"], r["baseline_pearson_q3"]),
                "Spearman r": cell(r["spearman_median"], r["spearman_q1"], r["spearman_q3"]),
                "baseline Spearman r": cell(r["baseline_spearman_median"], r["baseline_spearman_q1"], r["baseline_spearman_q3"]),
                "Pearson r, variable": cell(r["pearson_median_variable"], r["pearson_q1_variable"], r["pearson_q3_variable"]),
                "baseline, variable": cell(
                    r["baseline_pearson_median_variable"], r["baseline_pearson_q1_variable"], r["baseline_pearson_q3_variable"]
                ),
                "MAE": f"{r['mae']:.3f}",
                "baseline MAE": f"{r['baseline_mae']:.3f}",
            }
        )
    return pd.DataFrame(rows)


def write_report(table: pd.DataFrame, out: Path, options: argparse.Namespace, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    lines = [
        "# Reconstruction report",
        "",
        f"- command: `{command}`",
        f"- checkpoint: `{options.ckpt_path}`",
        f"- evaluated patients: the {options.split} split (saved in the checkpoint)",
        f"- git revision: `{git_revision()}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "Cells are the median [first quartile, third quartile] over features of the",
        "per-feature correlation between reconstruction and measurement. 'variable' keeps",
        f"features whose measured standard deviation exceeds {options.std_threshold}.",
        "The baseline is ridge regression from the input omics fitted on the training split,",
        "or the training mean when the slide is the only input (its r is undefined: n/a).",
        "MAE is in units of each feature's training standard deviation.",
        "",
        markdown_table(compact(table)),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "run.json").write_text(json.dumps({"command": command, "git_revision": git_revision()}, indent=2))


def write_figures(
    per_feature: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    passes: dict[tuple[str, ...], dict[str, np.ndarray]],
    data: Any,
    index: np.ndarray,
    modalities: list[str],
    out: Path,
) -> None:
    """Per-feature r distributions and best/worst feature scatter plots (PNG and tensorboard)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    for target in modalities:
        labels = [label for (t, label) in per_feature if t == target]
        figure, axis = plt.subplots(figsize=(1.8 * len(labels) + 2, 4))
        model_r = [v[0][np.isfinite(v[0])] for (t, _), v in per_feature.items() if t == target]
        base_r = [v[1][np.isfinite(v[1])] for (t, _), v in per_feature.items() if t == target]
        positions = np.arange(len(labels))
        axis.boxplot(model_r, positions=positions - 0.18, widths=0.3, patch_artist=True, boxprops={"facecolor": "tab:blue"})
        axis.boxplot([b if b.size else [np.nan] for b in base_r], positions=positions + 0.18, widths=0.3, patch_artist=True, boxprops={"facecolor": "tab:gray"})
        axis.set_xticks(positions, labels, rotation=15)
        axis.set_ylabel("per-feature Pearson r")
        axis.set_title(f"{target}: MORPHEUS (blue) and baseline (grey)")
        figure.tight_layout()
        figure.savefig(out / f"r_distribution_{target}.png", dpi=120)
        writer.add_figure(f"report/r_distribution_{target}", figure)
        plt.close(figure)

        # Best and worst features, reconstructed from the slide and all other modalities.
        label, inputs = labels[-1], input_subsets(modalities, target)[-1]
        r = per_feature[(target, label)][0]
        finite = np.flatnonzero(np.isfinite(r))
        if finite.size == 0:
            continue
        order = finite[np.argsort(r[finite])]
        chosen = [*order[::-1][:3], *order[:3]]
        has = data.modalities[target].present[index].numpy()
        truth = data.modalities[target].values[index].numpy()[has]
        reconstruction = passes[inputs][target][has]
        figure, axes = plt.subplots(2, 3, figsize=(10, 6.5))
        for axis, feature in zip(axes.ravel(), chosen):
            axis.scatter(truth[:, feature], reconstruction[:, feature], s=8, alpha=0.6)
            name = data.modalities[target].features[feature]
            axis.set_title(f"{name}: r = {r[feature]:.2f}", fontsize=9)
            axis.set_xlabel("measured (scaled)")
            axis.set_ylabel("reconstructed (scaled)")
        figure.suptitle(f"{target} from {label}: best (top) and worst (bottom) features")
        figure.tight_layout()
        figure.savefig(out / f"best_worst_{target}.png", dpi=120)
        writer.add_figure(f"report/best_worst_{target}", figure)
        plt.close(figure)
    writer.close()


def build_datamodule(config_path: str, ckpt_path: str) -> Any:
    """Instantiate the config's DataModule with the checkpoint's saved data state."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    config = read_config(config_path)
    if "data" not in config:
        raise InputError(f"{config_path} has no data section")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parsed = parser.parse_object({"data": config["data"]})
    parsed.data.init_args.restore_from = ckpt_path
    datamodule = parser.instantiate(parsed).data
    datamodule.setup("predict")
    return datamodule
