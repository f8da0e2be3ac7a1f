"""DDP on CPU: two processes (Lightning's ``ddp`` strategy, gloo backend) against one.

Each end-to-end run goes through the real command line. The two-process runs let
Lightning launch the second process itself, and every run gets its own process
group so that a hung run can be killed with all its processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import pandas as pd
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli, write_config, write_task_config
from data_modules import KFold, MorpheusDataModule, OmicsModality
from data_modules.groupings import Chunks, GeneSets
from data_modules.synthetic import SyntheticCohort, write_synthetic_cohort
from morpheus_pl import MaskedOmicsPretraining
from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.nn import sample_visible, seeded_uniform

#: Seconds one command may run before the test counts it as hung.
RUN_TIMEOUT = 150
#: Absolute tolerance between one- and two-process metrics. They differ only by the
#: order of float32 sums (measured differences are below 1e-6).
TOLERANCE = 1e-5

TWO_PROCESSES = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
SURVIVAL = {
    "class_path": "data_modules.SurvivalTargets",
    "init_args": {"event_column": "os_event", "n_bins": 3},
}
SUBTYPE = {"class_path": "data_modules.ClassTargets", "init_args": {"label_column": "subtype"}}
#: On ``odd_cohort`` this leaves 9 validation patients.
SPLIT = {"class_path": "data_modules.RandomSplit", "init_args": {"val_fraction": 0.25}}
N_VAL = 9


def run_cli_group(*args: str, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m morpheus_pl`` in its own process group, killed whole on timeout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "morpheus_pl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The DDP launcher's second process is in this group too.
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{args[0]} timed out after {timeout} s, probably hung. stderr:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_ok(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI and fail the test with its stderr unless it exits with 0."""
    result = run_cli_group(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def events_of(save_dir: Path) -> EventAccumulator:
    """Load the only TensorBoard run under ``save_dir``."""
    files = list(save_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file under {save_dir}, found {files}"
    return EventAccumulator(str(files[0].parent), size_guidance={"histograms": 0, "scalars": 0}).Reload()


def epoch_metrics(events: EventAccumulator, prefix: str = "val/") -> dict[str, float]:
    """Return the last logged value of every scalar whose tag starts with ``prefix``."""
    return {
        tag: events.Scalars(tag)[-1].value
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def assert_metrics_equal(got: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(got) == sorted(expected)
    for tag, value in expected.items():
        assert got[tag] == pytest.approx(value, abs=TOLERANCE, nan_ok=True), tag


def with_data_options(config: Path, **options) -> Path:
    """Set DataModule arguments in a config file written by ``write_task_config``."""
    settings = yaml.safe_load(config.read_text())
    settings["data"]["init_args"].update(options)
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def odd_cohort(tmp_path_factory) -> SyntheticCohort:
    """36 patients, ``N_VAL`` of them in the validation split of ``SPLIT``, 20% without DNAm."""
    root = tmp_path_factory.mktemp("odd")
    return write_synthetic_cohort(root, n_patients=36, missing={"dnam": 0.2}, seed=1)


def odd_datamodule(cohort: SyntheticCohort) -> MorpheusDataModule:
    dm = MorpheusDataModule(
        str(cohort.cohort),
        str(cohort.store),
        modalities={
            "rna": OmicsModality(str(cohort.omics["rna"]), GeneSets(str(cohort.gmt))),
            "dnam": OmicsModality(str(cohort.omics["dnam"]), Chunks(5)),
        },
        split=KFold(4, 0),
        n_patches=8,
        batch_size=4,
        num_workers=0,
    )
    dm.setup()
    return dm


def test_eval_sampler_serves_each_patient_once(odd_cohort):
    dm = odd_datamodule(odd_cohort)
    dataset = dm.dataset("val")
    assert len(dataset) % 2 == 1

    shares = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        shares.append(list(dm.val_dataloader().sampler))
    assert sorted(shares[0] + shares[1]) == list(range(len(dataset)))
    assert abs(len(shares[0]) - len(shares[1])) == 1

    dm.trainer = None
    assert not isinstance(dm.val_dataloader().sampler, torch.utils.data.DistributedSampler)


def test_eval_sampler_rejects_more_processes_than_patients(odd_cohort):
    dm = odd_datamodule(odd_cohort)
    n_val = len(dm.dataset("val"))
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": n_val + 1, "rank": 0})
    expected = rf"the val split of .*cohort.csv has {n_val} patient\(s\) for {n_val + 1} processes"
    with pytest.raises(InputError, match=expected):
        dm.val_dataloader()


def test_seeded_uniform_rows_follow_their_seed():
    both = seeded_uniform(torch.tensor([11, 4]), 6)
    swapped = seeded_uniform(torch.tensor([4, 11]), 6)
    assert both.dtype == torch.float64
    assert torch.equal(both, swapped.flip(0))
    assert not torch.equal(both[0], both[1])


def test_sample_visible_rejects_wrong_draw_shape():
    present = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"uniform has shape \(3, 6\), expected \(3, 7\)"):
        sample_visible([2, 3], present, 0.5, uniform=torch.rand(3, 6, dtype=torch.float64))


def test_eval_scores_do_not_depend_on_batching(odd_cohort):
    dm = odd_datamodule(odd_cohort)
    torch.manual_seed(0)
    module = MaskedOmicsPretraining(
        dm.feature_dim, dm.modality_specs, width=16, num_prototypes=4, heads=2, mlp_dim=16,
        decoder_width=16, decoder_heads=2, decoder_mlp_dim=16,
    ).eval()

    def scores(batch_size: int, reverse: bool) -> dict[str, float]:
        batches = list(dm.split_dataloader("val", batch_size=batch_size))
        if reverse:
            batches = batches[::-1]
        with torch.no_grad():
            for batch_idx, batch in enumerate(batches):
                module._eval_step(batch, batch_idx, "val")
        metrics = module.eval_metrics["val"]
        values = {name: metric.compute().item() for name, metric in metrics.items()}
        for metric in metrics.values():
            metric.reset()
        return values

    whole = scores(batch_size=64, reverse=False)
    pieces = scores(batch_size=2, reverse=True)
    assert sorted(pieces) == sorted(whole)
    for name, value in whole.items():
        assert pieces[name] == pytest.approx(value, abs=TOLERANCE), name


@pytest.fixture(scope="module")
def pretraining_ddp(odd_cohort, tmp_path_factory) -> dict:
    """A one-epoch pre-training fit in two processes, then validate in one and in two.

    Validation uses batches of 2, so with 9 patients one process runs 3 batches of 5
    patients and the other 2 batches of 4, and the bags differ in length.
    """
    root = tmp_path_factory.mktemp("pretraining_ddp")
    configs = {
        name: write_config(
            root / f"{name}.yaml", odd_cohort, root / name, max_epochs=1, split=SPLIT, eval_batch_size=2
        )
        for name in ("fit", "validate_one", "validate_two")
    }

    run_ok("fit", "--config", str(configs["fit"]), *TWO_PROCESSES)
    checkpoint = root / "fit" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    run_ok("validate", "--config", str(configs["validate_one"]), "--ckpt_path", str(checkpoint))
    run_ok(
        "validate", "--config", str(configs["validate_two"]), "--ckpt_path", str(checkpoint), *TWO_PROCESSES
    )
    return {"checkpoint": checkpoint, **{name: events_of(root / name) for name in configs}}


@pytest.mark.timeout(600)
def test_pretraining_fit_ddp_matches_single_process(pretraining_ddp):
    fit = epoch_metrics(pretraining_ddp["fit"])
    single = epoch_metrics(pretraining_ddp["validate_one"])
    for modality in ("rna", "dnam"):
        for name in ("loss", "baseline_loss", "pearson"):
            assert f"val/{name}_{modality}" in single
    assert "val/loss" in single
    assert_metrics_equal(fit, single)


@pytest.mark.timeout(600)
def test_pretraining_validate_ddp_uneven_ranks(pretraining_ddp):
    checkpoint = torch.load(pretraining_ddp["checkpoint"], map_location="cpu", weights_only=False)
    assert len(checkpoint["MorpheusDataModule"]["patients"]["val"]) == N_VAL

    two = epoch_metrics(pretraining_ddp["validate_two"])
    single = epoch_metrics(pretraining_ddp["validate_one"])
    assert_metrics_equal(two, single)


@pytest.mark.timeout(600)
def test_pearson_histogram_covers_all_processes(pretraining_ddp):
    for modality in ("rna", "dnam"):
        tag = f"val/pearson_per_feature_{modality}"
        fit = pretraining_ddp["fit"].Histograms(tag)[-1].histogram_value
        single = pretraining_ddp["validate_one"].Histograms(tag)[-1].histogram_value
        assert fit.num == single.num, tag
        assert fit.sum == pytest.approx(single.sum, abs=TOLERANCE), tag
        assert fit.sum_squares == pytest.approx(single.sum_squares, abs=TOLERANCE), tag


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("task", "targets", "metric"),
    [("SurvivalTask", SURVIVAL, "val/c_index"), ("ClassificationTask", SUBTYPE, "val/auroc")],
)
def test_task_fit_ddp_matches_single_process(odd_cohort, tmp_path, task, targets, metric):
    model = {"class_path": f"morpheus_pl.{task}"}
    configs = {}
    for name in ("fit", "validate"):
        config = write_task_config(
            tmp_path / f"{name}.yaml", odd_cohort, tmp_path / name, model, targets, SPLIT
        )
        # Batches of 2 leave the processes with 5 and 4 patients, in 3 and 2 batches.
        configs[name] = with_data_options(config, eval_batch_size=2)

    run_ok("fit", "--config", str(configs["fit"]), *TWO_PROCESSES)
    checkpoint = tmp_path / "fit" / "task" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["MorpheusDataModule"]
    assert len(state["patients"]["val"]) == N_VAL
    run_ok("validate", "--config", str(configs["validate"]), "--ckpt_path", str(checkpoint))

    fit = epoch_metrics(events_of(tmp_path / "fit"))
    single = epoch_metrics(events_of(tmp_path / "validate"))
    assert metric in single
    assert "val/loss" in single
    assert_metrics_equal(fit, single)


@pytest.fixture
def sparse_dnam_cohort(tmp_path) -> SyntheticCohort:
    """12 patients split by a column into 8 training and 4 validation patients.

    Of the training patients, only one has DNAm.

    Two processes with 4 training patients each and batches of 2 run 2 steps per
    epoch. The DNAm patient sits in one batch of one process, so in that step the
    other process's batch has no DNAm, and in the other step neither has any.
    """
    cohort = write_synthetic_cohort(tmp_path / "sparse", n_patients=12, seed=2)
    table = pd.read_csv(cohort.cohort)
    order = sorted(table["patient_id"].unique())
    train, val = order[:8], order[8:]
    table["split"] = table["patient_id"].map({p: "train" if p in train else "val" for p in order})
    table.to_csv(cohort.cohort, index=False)

    dnam = ad.read_h5ad(cohort.omics["dnam"])
    keep = [f"{train[0]}-01A", *(f"{p}-01A" for p in val)]
    dnam[keep].copy().write_h5ad(cohort.omics["dnam"])
    return cohort


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "task",
    [None, pytest.param("SurvivalTask", marks=pytest.mark.slow)],
    ids=["pretraining", "survival"],
)
def test_modality_absent_on_one_rank_trains(sparse_dnam_cohort, tmp_path, task):
    split = {"class_path": "data_modules.ColumnSplit", "init_args": {"column": "split"}}
    if task is None:
        config = write_config(
            tmp_path / "c.yaml", sparse_dnam_cohort, tmp_path / "runs", max_epochs=2, split=split, batch_size=2
        )
        run_name = "tiny"
    else:
        model = {"class_path": f"morpheus_pl.{task}"}
        config = write_task_config(
            tmp_path / "c.yaml", sparse_dnam_cohort, tmp_path / "runs", model, SURVIVAL, split, max_epochs=2
        )
        config = with_data_options(config, batch_size=2)
        run_name = "task"

    result = run_cli_group("fit", "--config", str(config), *TWO_PROCESSES)
    # torch's message, and the one Lightning raises in its place.
    assert "Expected to have finished reduction" not in result.stderr
    assert "parameters that were not used in producing the loss" not in result.stderr
    assert result.returncode == 0, result.stderr[-4000:]

    checkpoint = torch.load(
        tmp_path / "runs" / run_name / "version_0" / "checkpoints" / "last.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    assert len(checkpoint["MorpheusDataModule"]["patients"]["train"]) == 8
    # Two epochs of two steps each, every step on both processes.
    assert checkpoint["global_step"] == 4
    losses = epoch_metrics(events_of(tmp_path / "runs"), "train/")
    assert losses
    assert torch.isfinite(torch.tensor(list(losses.values()))).all(), losses


def test_too_many_processes_stop_before_writing(tiny_cohort, tmp_path):
    # 40 patients with a 2.5% validation fraction leave one validation patient for two
    # processes: the run must stop before the logger makes its folder.
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=1)
    result = run_cli(
        "fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--data.init_args.split.init_args.val_fraction", "0.025",
    )
    assert result.returncode == 2
    assert "1 patient(s) for 2 processes" in result.stderr
    assert "val_fraction" in result.stderr
    assert not (tmp_path / "runs").exists()
