"""Tests of the survival maths, the c-index and survival labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines.utils import concordance_index

from data_modules import KFold, MorpheusDataModule, SurvivalTargets
from morpheus_pl import batch as keys
from morpheus_pl.errors import InputError
from morpheus_pl.metrics import ConcordanceIndex, harrell_c_index
from morpheus_pl.nn.survival import (
    cox_partial_nll,
    hazard_risk,
    logistic_hazard_nll,
    survival_function,
    time_to_bin,
)


@pytest.mark.parametrize("seed", range(5))
def test_c_index_matches_lifelines_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 120
    time = rng.integers(1, 15, size=n).astype(float)  # many tied times
    event = rng.random(n) < 0.6
    risk = rng.integers(0, 6, size=n).astype(float)  # many tied risks
    ours, pairs = harrell_c_index(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    expected = concordance_index(time, -risk, event)
    assert pairs > 0
    assert ours == pytest.approx(expected, abs=1e-12)


def test_c_index_tie_rules_by_hand():
    # (time, event, risk)
    time = torch.tensor([1.0, 1.0, 1.0, 2.0])
    event = torch.tensor([True, True, False, True])
    risk = torch.tensor([3.0, 1.0, 2.0, 3.0])
    # Comparable: (0,2) event vs censored at the same time, (0,3), (1,2), (1,3).
    # Not comparable: (0,1) two tied events; pairs starting at censored patient 2.
    # Concordant: (0,2) 3>2 yes; (0,3) 3=3 half; (1,2) 1<2 no; (1,3) 1<3 no.
    value, pairs = harrell_c_index(risk, time, event)
    assert pairs == 4
    assert value == pytest.approx(1.5 / 4)


def test_c_index_nan_without_pairs():
    metric = ConcordanceIndex()
    metric.update(torch.tensor([0, 1]), risk=torch.tensor([0.2, 0.1]), time=torch.tensor([5.0, 3.0]), event=torch.tensor([False, False]))
    with pytest.warns(UserWarning, match="no comparable pair"):
        result = metric.compute()
    assert torch.isnan(result["c_index"])


def test_c_index_counts_each_patient_once():
    risk = torch.tensor([0.9, 0.1, 0.5])
    time = torch.tensor([1.0, 5.0, 3.0])
    event = torch.tensor([True, True, False])
    once = ConcordanceIndex()
    once.update(torch.tensor([0, 1, 2]), risk=risk, time=time, event=event)
    repeated = ConcordanceIndex()
    repeated.update(torch.tensor([0, 1, 2]), risk=risk, time=time, event=event)
    repeated.update(torch.tensor([0]), risk=risk[:1], time=time[:1], event=event[:1])
    assert once.compute()["c_index"] == repeated.compute()["c_index"]


def test_time_to_bin_edges():
    cuts = torch.tensor([10.0, 20.0])
    bins = time_to_bin(torch.tensor([0.0, 9.9, 10.0, 15.0, 20.0, 99.0]), cuts)
    assert bins.tolist() == [0, 0, 1, 1, 2, 2]


def test_logistic_hazard_nll_by_hand():
    logits = torch.tensor([[0.3, -1.0, 0.5], [1.2, 0.0, -0.4]])
    bins = torch.tensor([2, 1])
    event = torch.tensor([True, False])
    h = torch.sigmoid(logits)
    event_patient = -(torch.log(1 - h[0, 0]) + torch.log(1 - h[0, 1]) + torch.log(h[0, 2]))
    censored_patient = -(torch.log(1 - h[1, 0]) + torch.log(1 - h[1, 1]))
    expected = (event_patient + censored_patient) / 2
    assert logistic_hazard_nll(logits, bins, event).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hazard_risk_orders_by_hazard():
    low = torch.full((1, 4), -3.0)
    high = torch.full((1, 4), 1.0)
    assert hazard_risk(high) > hazard_risk(low)
    survival = survival_function(torch.zeros(1, 3))
    torch.testing.assert_close(survival, torch.tensor([[0.5, 0.25, 0.125]]))


def test_cox_partial_nll_breslow_by_hand():
    risk = torch.tensor([0.5, -0.2, 1.0, 0.0])
    time = torch.tensor([2.0, 2.0, 5.0, 1.0])
    event = torch.tensor([True, True, False, True])
    total = 0.0
    for i in range(4):
        if event[i]:
            at_risk = time >= time[i]
            total += risk[i] - torch.logsumexp(risk[at_risk], dim=0)
    expected = -total / 3
    assert cox_partial_nll(risk, time, event).item() == pytest.approx(float(expected), rel=1e-6)


def test_cox_without_events_is_attached_zero():
    risk = torch.tensor([0.3, 0.1], requires_grad=True)
    loss = cox_partial_nll(risk, torch.tensor([1.0, 2.0]), torch.tensor([False, False]))
    assert loss.item() == 0.0
    loss.backward()


def test_targets_need_exactly_one_flag():
    with pytest.raises(InputError, match="exactly one of event_column"):
        SurvivalTargets(event_column=None, censorship_column=None)
    with pytest.raises(InputError, match="exactly one of event_column"):
        SurvivalTargets(event_column="e", censorship_column="c")


def test_censorship_column_is_inverted():
    table = pd.DataFrame({"t": [1.0, 2.0, 3.0], "censorship": [1, 0, 1]}, index=["a", "b", "c"])
    data = SurvivalTargets("t", event_column=None, censorship_column="censorship").read(table, ["a", "b", "c"], "x.csv")
    assert data.tensors[keys.EVENT].tolist() == [False, True, False]


def test_invalid_event_flag():
    table = pd.DataFrame({"t": [1.0, 2.0], "e": [1, 2]}, index=["a", "b"])
    with pytest.raises(InputError, match="patient 'b' has 'e' = 2; expected 0 or 1"):
        SurvivalTargets("t", "e").read(table, ["a", "b"], "x.csv")


def test_unusable_times_are_invalid():
    table = pd.DataFrame({"t": [1.0, None, -2.0], "e": [1, 1, 0]}, index=["a", "b", "c"])
    data = SurvivalTargets("t", "e").read(table, ["a", "b", "c"], "x.csv")
    assert data.valid.tolist() == [True, False, False]


def survival_datamodule(cohort, fold=0, **split):
    return MorpheusDataModule(
        str(cohort.cohort),
        str(cohort.store),
        modalities={},
        split=KFold(n_folds=3, fold=fold, **split),
        targets=SurvivalTargets("os_months", "os_event", n_bins=4),
        num_workers=0,
    )


def test_bins_come_from_training_fold_only(own_cohort):
    dm = survival_datamodule(own_cohort)
    data = dm.data
    train = data.indices("train")
    time = data.targets.tensors[keys.TIME].numpy()
    event = data.targets.tensors[keys.EVENT].numpy()
    expected = np.quantile(time[train][event[train]], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(dm.target_info["time_bins"], expected, rtol=1e-6)

    # Changing the held-out patients' times leaves the bins unchanged.
    table = pd.read_csv(own_cohort.cohort)
    held_out = {data.patients[i] for i in data.indices("test")}
    table.loc[table["patient_id"].isin(held_out), "os_months"] *= 100
    table.to_csv(own_cohort.cohort, index=False)
    again = survival_datamodule(own_cohort)
    assert again.target_info["time_bins"] == dm.target_info["time_bins"]


def test_training_fold_without_events(own_cohort):
    table = pd.read_csv(own_cohort.cohort)
    table["os_event"] = 0
    table.to_csv(own_cohort.cohort, index=False)
    with pytest.raises(InputError, match="the training split has no event .* survival time bins cannot be placed"):
        survival_datamodule(own_cohort).setup()


def test_missing_label_column(own_cohort):
    dm = MorpheusDataModule(
        str(own_cohort.cohort),
        str(own_cohort.store),
        targets=SurvivalTargets("overall_survival", "os_event"),
        num_workers=0,
    )
    with pytest.raises(InputError, match=r"missing column\(s\) \['overall_survival'\]"):
        dm.setup()


def test_null_string_from_command_line_means_none():
    targets = SurvivalTargets("t", event_column="None", censorship_column="c")
    assert targets.event_column is None
    assert targets.columns == ["t", "c"]


def test_fewshot_needs_class_labels(own_cohort):
    from data_modules import FewShot

    dm = MorpheusDataModule(
        str(own_cohort.cohort),
        str(own_cohort.store),
        split=FewShot(k=2),
        targets=SurvivalTargets("os_months", "os_event"),
        num_workers=0,
    )
    with pytest.raises(InputError, match="FewShot samples patients per class, so it needs class labels"):
        dm.setup()
