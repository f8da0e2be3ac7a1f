"""The benchmark scripts run end to end at small sizes (their figures are not checked)."""

from __future__ import annotations

from morpheus_pl.benchmarks import gpu


def test_gpu_script_runs_on_cpu():
    # The GPU script takes a device, so its code paths run here on the CPU.
    for precision in ("fp32", "bf16"):
        assert gpu.step_throughput(precision, batch=2, patches=16, dim=32, steps=1, device="cpu") > 0
    split = gpu.data_wait_split(patients=40, steps=6, num_workers=0, device="cpu", patches=(16, 32), draw=16)
    assert split["compute_seconds"] > 0
    assert split["data_wait_seconds"] >= 0
    assert split["num_workers"] == 0
