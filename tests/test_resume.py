"""Resume after a kill, repeatability of a seeded run, and reruns into old log folders."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli, write_config

KILLER = '''
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback


class KillAt(Callback):
    """SIGKILL this process after optimiser step ``step``, once (a marker file remembers)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
'''


def run_in(folder: Path, *args: str):
    """Run the CLI with ``folder`` on the import path (for the test's own callback)."""
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env_path) if p)
    try:
        return run_cli(*args)
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            del os.environ["PYTHONPATH"]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def train_losses(version: Path) -> list[float]:
    events = EventAccumulator(str(version)).Reload()
    return [e.value for e in events.Scalars("train/loss_step")]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cohort, tmp_path_factory) -> Path:
    """The run folder of a three-epoch pre-training that ran without interruption."""
    root = tmp_path_factory.mktemp("whole")
    config = write_config(root / "c.yaml", tiny_cohort, root / "runs", max_epochs=3)
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "tiny" / "version_0"


def test_killed_run_resumes_identically(tiny_cohort, uninterrupted, tmp_path):
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    marker = tmp_path / "killed"
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=3)
    # 30 training patients in batches of 8: four steps per epoch, so step 6 is mid-epoch 1.
    killer = {"class_path": "killer.KillAt", "init_args": {"step": 6, "marker": str(marker)}}
    parsed = yaml.safe_load(config.read_text())
    parsed["trainer"]["callbacks"] = [killer]
    config.write_text(yaml.safe_dump(parsed, sort_keys=False))

    first = run_in(tmp_path, "fit", "--config", str(config))
    assert first.returncode == -9, first.stderr[-2000:]
    version = tmp_path / "runs" / "tiny" / "version_0"
    assert marker.exists()
    assert (version / "checkpoints" / "last.ckpt").exists()
    assert torch.load(version / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0

    # Restart the way a requeued job does: the saved config and --ckpt_path last.
    second = run_in(tmp_path, "fit", "--config", str(version / "config.yaml"), "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists(), "the resumed run must reuse its version"
    assert list(version.glob("config.resumed-*.yaml")), "the resumed run records its own config"

    resumed, whole = weights(version / "checkpoints" / "last.ckpt"), weights(uninterrupted / "checkpoints" / "last.ckpt")
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


def test_same_seed_same_loss_curve(tiny_cohort, uninterrupted, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=3)
    result = run_cli("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    again = train_losses(tmp_path / "runs" / "tiny" / "version_0")
    first = train_losses(uninterrupted)
    assert len(first) == 12
    assert again == first

    # A different seed gives a different curve, so the comparison above can fail.
    other = run_cli("fit", "--config", str(config), "--seed_everything", "8")
    assert other.returncode == 0, other.stderr[-3000:]
    assert train_losses(tmp_path / "runs" / "tiny" / "version_1") != first


def test_last_without_checkpoint_starts_fresh(tiny_cohort, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=1)
    result = run_cli("fit", "--config", str(config), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no last.ckpt" in result.stderr
    assert (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_rerun_fixed_version_names_option(tiny_cohort, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=1)
    fixed = ("--trainer.logger.init_args.version", "0")
    assert run_cli("fit", "--config", str(config), *fixed).returncode == 0
    version = tmp_path / "runs" / "tiny" / "version_0"
    before = sorted(p.relative_to(version) for p in version.rglob("*"))

    again = run_cli("fit", "--config", str(config), *fixed)
    assert again.returncode == 2
    assert "trainer.logger.init_args.version" in again.stderr
    assert "--ckpt_path last" in again.stderr
    assert "Traceback" not in again.stderr
    assert sorted(p.relative_to(version) for p in version.rglob("*")) == before

    # Without a fixed version, the same command starts a new one.
    assert run_cli("fit", "--config", str(config)).returncode == 0
    assert (tmp_path / "runs" / "tiny" / "version_1" / "config.yaml").exists()


def test_last_checkpoint_follows_every_epoch(tiny_cohort, tmp_path):
    # With a zero learning rate the validation loss never improves after epoch 0, so
    # only epoch 0 gets a monitored checkpoint. last.ckpt must still move on.
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=3)
    result = run_cli("fit", "--config", str(config), "--model.init_args.lr", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    best = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]
    assert [p.name.startswith("epoch000") for p in best] == [True]
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2
    assert last["global_step"] == 12


def test_saved_config_resumes_its_own_version(tiny_cohort, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=1)
    assert run_cli("fit", "--config", str(config)).returncode == 0
    assert run_cli("fit", "--config", str(config)).returncode == 0
    runs = tmp_path / "runs" / "tiny"
    older = runs / "version_0"

    result = run_cli("fit", "--config", str(older / "config.yaml"), "--ckpt_path", "last", "--trainer.max_epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {older / 'checkpoints' / 'last.ckpt'}" in result.stderr
    assert torch.load(older / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0


def test_validate_last_needs_a_checkpoint(tiny_cohort, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=1)
    missing = run_cli("validate", "--config", str(config), "--ckpt_path", "last")
    assert missing.returncode == 2
    assert "no last.ckpt" in missing.stderr
    assert "pass the checkpoint file" in missing.stderr
    assert not (tmp_path / "runs").exists()

    assert run_cli("fit", "--config", str(config)).returncode == 0
    found = run_cli("validate", "--config", str(config), "--ckpt_path", "last")
    assert found.returncode == 0, found.stderr[-3000:]
    assert "using " in found.stderr
    assert "last.ckpt" in found.stderr


def test_last_checkpoint_without_final_validation(tiny_cohort, tmp_path):
    # Validation every second epoch of three: the last epoch ends without one.
    config = write_config(tmp_path / "c.yaml", tiny_cohort, tmp_path / "runs", max_epochs=3)
    result = run_cli("fit", "--config", str(config), "--trainer.check_val_every_n_epoch", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    assert [p.name[:8] for p in checkpoints.iterdir() if p.name != "last.ckpt"] == ["epoch001"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2
    assert last["global_step"] == 12
