"""Evaluation protocols that run many fits and end in one results table.

``cv`` runs k-fold cross-validation, ``fewshot`` runs seeded k-shot samplings and
``sweep`` runs the Cartesian product of config values. Each run is an ordinary
``fit`` from the same config (with the protocol's overrides), followed by ``test``
on the final weights. The table has one row per run, then the mean, the standard
deviation and the count of non-NaN values per metric. It is written as CSV and
markdown beside the resolved config, the exact command and the git revision.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import logging
import math
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

PROTOCOLS = ("cv", "fewshot", "sweep")


def git_revision() -> str:
    """Return the package's git commit (with ``+dirty`` for local changes), or ``unknown``."""
    # Ask in the package's own folder: the command may run anywhere.
    package = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=package
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=package,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def read_config(path: str, what: str = "config file") -> dict[str, Any]:
    """Load a YAML file as a dict; ``what`` names the file in the error message."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{what} not found: {file.resolve()}")
    return yaml.safe_load(file.read_text()) or {}


def config_split(config: dict[str, Any], class_name: str) -> dict[str, Any]:
    """Return the ``init_args`` of the config's split if it is ``class_name``, else ``{}``."""
    split = (config.get("data", {}).get("init_args", {}) or {}).get("split") or {}
    if isinstance(split, dict) and str(split.get("class_path", "")).endswith(class_name):
        return dict(split.get("init_args") or {})
    return {}


def override(key: str, value: Any) -> str:
    """Format one command-line override: strings as they are, other values as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def fit_and_test(args: list[str], run_dir: Path, keep_checkpoints: bool = False) -> tuple[dict[str, float], str]:
    """Fit one run from command-line style ``args``, then test its final weights.

    Without ``keep_checkpoints`` no checkpoint is written; with it, only the final
    weights (``last.ckpt``, without optimiser state).

    Returns the test metrics and the resolved config as YAML.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    from morpheus_pl.cli import MorpheusCLI

    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": "", "version": ""},
    }
    if keep_checkpoints:
        checkpoints = ["--checkpoint.save_top_k=0", "--checkpoint.save_weights_only=true"]
    else:
        checkpoints = ["--trainer.enable_checkpointing=false"]
    # LightningCLI warns when sys.argv contains arguments besides the ones passed in.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = MorpheusCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[
                *args,
                override("trainer.logger", logger),
                f"--trainer.default_root_dir={run_dir}",
                *checkpoints,
            ],
            run=False,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    resolved = cli.parser.dump(cli.config, skip_none=False)
    return metrics, resolved


def summarise(rows: list[dict[str, Any]], label_columns: Sequence[str]) -> pd.DataFrame:
    """Append mean, standard deviation and non-NaN count rows to the per-run rows."""
    table = pd.DataFrame(rows)
    metrics = [c for c in table.columns if c not in label_columns]
    values = table[metrics].astype(float)
    summary = pd.DataFrame(
        [values.mean(skipna=True), values.std(skipna=True, ddof=1), values.notna().sum().astype(float)],
        index=["mean", "std", "n"],
    )
    # The statistic's name goes in the first label column, the others stay empty.
    for i, column in enumerate(label_columns):
        summary[column] = summary.index if i == 0 else ""
    table[list(label_columns)] = table[list(label_columns)].astype(str)
    return pd.concat([table, summary[table.columns]], ignore_index=True)


def write_table(
    table: pd.DataFrame, out: Path, title: str, command: str, resolved_config: str
) -> None:
    """Write ``results.csv``, ``results.md``, ``config.yaml`` and ``run.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    revision = git_revision()
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- git revision: `{revision}`",
        f"- date: {when}",
        "- config: `config.yaml` beside this file (the resolved config of the first run)",
        "",
        markdown_table(table),
        "",
        "`n` counts the runs with a defined (non-NaN) value; means and standard deviations",
        "leave NaN runs out.",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))
    (out / "config.yaml").write_text(resolved_config)
    (out / "run.json").write_text(json.dumps({"command": command, "git_revision": revision, "date": when}, indent=2))


@dataclass
class Run:
    """One fit of a protocol.

    Attributes:
        labels: Columns that identify the run in the table (fold, sampling, values).
        overrides: Command-line overrides of this run.
        name: Folder of the run's logs and checkpoints, inside the output folder.
    """

    labels: dict[str, Any]
    overrides: list[str]
    name: str


def markdown_table(table: pd.DataFrame) -> str:
    """Format a table as GitHub markdown; floats get four decimals."""

    def cell(value: Any, count: bool) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "NaN"
            return f"{value:.0f}" if count else f"{value:.4f}"
        return str(value)

    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = []
    for row in table.itertuples(index=False):
        count = str(row[0]) == "n"
        body.append("| " + " | ".join(cell(v, count) for v in row) + " |")
    return "\n".join([header, rule, *body])


def run_all(
    runs: list[Run],
    base_args: list[str],
    out: Path,
    title: str,
    command: str,
    runner: Callable[[list[str], Path], tuple[dict[str, float], str]] = fit_and_test,
) -> pd.DataFrame:
    """Run every ``(labels, overrides)`` pair and write the table.

    Args:
        runs: The runs, in order.
        base_args: Arguments shared by all runs (the config and user overrides).
        out: Output folder.
        title: Table title.
        command: The command line, recorded beside the table.
        runner: Function that fits and tests one run.
    """
    rows, first_config = [], ""
    for number, run in enumerate(runs, start=1):
        log.info("%s: run %d of %d (%s)", title, number, len(runs), run.labels)
        metrics, resolved = runner([*base_args, *run.overrides], out / run.name)
        first_config = first_config or resolved
        rows.append({**run.labels, **metrics})
        log.info("%s: run %d finished: %s", title, number, {k: round(v, 4) for k, v in metrics.items()})
    table = summarise(rows, list(runs[0].labels))
    write_table(table, out, title, command, first_config)
    log.info("%s: results in %s\n%s", title, out, table.to_string(index=False))
    return table


def parse_grid(path: str) -> list[dict[str, Any]]:
    """Read a grid file (dotted config key to a list of values) into its combinations."""
    grid = read_config(path, "grid file")
    if not isinstance(grid, dict) or not grid:
        raise InputError(f"{path}: expected a mapping of config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{path}: {key!r} must map to a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def main(argv: list[str]) -> None:
    """Entry point of ``python -m morpheus_pl cv|fewshot|sweep``."""
    protocol = argv[0]
    parser = argparse.ArgumentParser(
        prog=f"python -m morpheus_pl {protocol}",
        description={
            "cv": "k-fold cross-validation at patient level: one fit and test per fold.",
            "fewshot": "k-shot training on n seeded samplings; all other labelled patients evaluate.",
            "sweep": "one fit and test per combination of the config values in a grid file.",
        }[protocol],
        epilog="Other arguments (such as --trainer.max_epochs=5) override the config in every run.",
    )
    parser.add_argument("-c", "--config", required=True, help="experiment config (YAML)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<protocol>/<config>-<time>)")
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="save each run's final weights (last.ckpt, no optimiser state); by default none are kept",
    )
    if protocol == "cv":
        parser.add_argument("--folds", type=int, default=None, help="number of folds (default: the config's KFold n_folds, else 5)")
        parser.add_argument("--group-column", default=None, help="cohort column whose values never straddle folds")
    elif protocol == "fewshot":
        parser.add_argument("--k", type=int, default=None, help="training patients per class (default: the config's FewShot k, else 5)")
        parser.add_argument("--samplings", type=int, default=10, help="number of seeded samplings (default 10)")
    else:
        parser.add_argument("--grid", required=True, help="YAML file: dotted config key -> list of values")
    options, overrides = parser.parse_known_args(argv[1:])

    config = read_config(options.config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = options.out or Path("runs") / protocol / f"{Path(options.config).stem}-{stamp}"
    base_args = ["--config", options.config, *overrides]
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "morpheus_pl", *argv])

    runs: list[Run] = []
    if protocol == "cv":
        split = config_split(config, "KFold")
        n_folds = options.folds or int(split.get("n_folds", 5))
        if options.group_column:
            split["group_column"] = options.group_column
        for fold in range(n_folds):
            value = {"class_path": "data_modules.KFold", "init_args": {**split, "n_folds": n_folds, "fold": fold}}
            runs.append(Run({"fold": fold}, [override("data.init_args.split", value)], f"fold{fold}"))
        title = f"{n_folds}-fold cross-validation of {options.config}"
    elif protocol == "fewshot":
        split = config_split(config, "FewShot")
        k = options.k or int(split.get("k", 5))
        for sampling in range(options.samplings):
            value = {"class_path": "data_modules.FewShot", "init_args": {**split, "k": k, "sampling": sampling}}
            runs.append(
                Run({"sampling": sampling}, [override("data.init_args.split", value)], f"sampling{sampling:02d}")
            )
        title = f"{k}-shot, {options.samplings} samplings of {options.config}"
    else:
        for number, combination in enumerate(parse_grid(options.grid)):
            labels = {key: str(value) for key, value in combination.items()}
            overrides_of_run = [override(key, value) for key, value in combination.items()]
            runs.append(Run(labels, overrides_of_run, f"run{number:03d}"))
        title = f"sweep of {options.config} over {options.grid}"
    runner = functools.partial(fit_and_test, keep_checkpoints=options.keep_checkpoints)
    run_all(runs, base_args, out, title, command, runner)
