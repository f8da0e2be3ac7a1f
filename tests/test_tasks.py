"""Tests of the downstream LightningModules and their initialisation."""

from __future__ import annotations

import logging

import pytest
import torch

from data_modules import ClassTargets, KFold, MorpheusDataModule, OmicsModality, SurvivalTargets
from data_modules.groupings import Chunks, GeneSets
from morpheus_pl import ClassificationTask, MaskedOmicsPretraining, SurvivalTask
from morpheus_pl.errors import InputError

SMALL = dict(width=16, num_prototypes=4, heads=2, mlp_dim=16)


def labelled_datamodule(cohort, targets, dnam_groups: int = 5) -> MorpheusDataModule:
    return MorpheusDataModule(
        str(cohort.cohort),
        str(cohort.store),
        modalities={
            "rna": OmicsModality(str(cohort.omics["rna"]), GeneSets(str(cohort.gmt))),
            "dnam": OmicsModality(str(cohort.omics["dnam"]), Chunks(dnam_groups)),
        },
        split=KFold(4, 0),
        targets=targets,
        n_patches=8,
        batch_size=6,
        num_workers=0,
    )


def task_of(dm, cls=SurvivalTask, **kwargs):
    options = dict(SMALL)
    options.update(kwargs)
    return cls(patch_dim=dm.feature_dim, modalities=dm.modality_specs, target_info=dm.target_info, **options)


def test_pretrained_encoder_loaded_and_decoders_dropped(tiny_cohort, pretrained_checkpoint, caplog):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"))
    source = MaskedOmicsPretraining.load_from_checkpoint(pretrained_checkpoint, map_location="cpu")
    with caplog.at_level(logging.INFO):
        task = task_of(dm, pretrained=str(pretrained_checkpoint), width=64, heads=4)
    report = task.load_report
    assert task.hparams.width == 16  # taken from the checkpoint, not the argument
    assert any(name.startswith("decoders.") for name in report.skipped)
    assert not any(name.startswith("decoders.") for name in report.loaded)
    assert report.new == []
    for name, value in task.encoder.state_dict().items():
        torch.testing.assert_close(value, source.model.state_dict()[name])
    assert task.hparams.pretrained is None
    assert task.hparams.initialised_from == str(pretrained_checkpoint)


def test_unused_modality_tokenizer_skipped(tiny_cohort, pretrained_checkpoint):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"))
    task = task_of(dm, pretrained=str(pretrained_checkpoint), input_modalities=["rna"])
    assert task.load_report.skipped["tokenizers.dnam.mlp.0.weight"] == "modality not used"
    assert "tokenizers.rna.mlp.0.weight" in task.load_report.loaded


def test_checkpoint_with_other_groups_is_rejected(tiny_cohort, pretrained_checkpoint):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"), dnam_groups=6)
    with pytest.raises(InputError, match="the groups of modality 'dnam' differ from the data's"):
        task_of(dm, pretrained=str(pretrained_checkpoint))


def test_missing_pretrained_file(tiny_cohort, tmp_path):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"))
    with pytest.raises(InputError, match="checkpoint not found: .*nope.ckpt"):
        task_of(dm, pretrained=str(tmp_path / "nope.ckpt"))


def test_frozen_encoder_keeps_weights(tiny_cohort):
    dm = labelled_datamodule(tiny_cohort, ClassTargets("subtype"))
    dm.setup("fit")
    task = task_of(dm, ClassificationTask, freeze_encoder=True, lr=0.1)
    before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    head_before = task.head.weight.clone()
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    task.train()
    assert not task.encoder.training
    batch = next(iter(dm.train_dataloader()))
    loss = task.compute_loss(task(batch, task.input_modalities), batch)
    loss.backward()
    optimizer.step()
    for name, value in task.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(task.head.weight, head_before)


def test_slide_only_ignores_omics(tiny_cohort):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"))
    dm.setup("fit")
    task = task_of(dm, input_modalities=[]).eval()
    assert list(task.encoder.tokenizers) == []
    batch = next(iter(dm.val_dataloader()))
    first = task(batch)
    batch["omics"] = {m: v + 100 for m, v in batch["omics"].items()}
    torch.testing.assert_close(task(batch), first)


def test_eval_modalities_must_be_inputs(tiny_cohort):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"))
    with pytest.raises(InputError, match=r"eval_modalities \['dnam'\] are not among input_modalities \['rna'\]"):
        task_of(dm, input_modalities=["rna"], eval_modalities=["dnam"])


def test_task_without_labels(tiny_cohort):
    dm = MorpheusDataModule(str(tiny_cohort.cohort), str(tiny_cohort.store), num_workers=0)
    with pytest.raises(InputError, match="SurvivalTask needs labels: set data.targets"):
        SurvivalTask(patch_dim=dm.feature_dim, modalities={}, target_info=None)


def test_cox_head_has_one_output(tiny_cohort):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event", n_bins=4))
    assert task_of(dm, loss="cox").head.out_features == 1
    assert task_of(dm).head.out_features == 4


def test_balanced_class_weights(tiny_cohort):
    dm = labelled_datamodule(tiny_cohort, ClassTargets("subtype"))
    task = task_of(dm, ClassificationTask, class_weights="balanced")
    counts = torch.tensor(dm.target_info["train_counts"], dtype=torch.float32)
    torch.testing.assert_close(task.class_weights * counts, torch.full((3,), counts.sum() / 3))


def test_features_from_reuses_pretraining_groups(tiny_cohort, pretrained_checkpoint):
    dm = labelled_datamodule(tiny_cohort, SurvivalTargets(event_column="os_event"), dnam_groups=6)
    dm.features_from = str(pretrained_checkpoint)
    source = MaskedOmicsPretraining.load_from_checkpoint(pretrained_checkpoint, map_location="cpu")
    assert dm.modality_specs["dnam"]["groups"] == source.hparams.modalities["dnam"]["groups"]
    task = task_of(dm, pretrained=str(pretrained_checkpoint))
    assert "tokenizers.dnam.mlp.0.weight" in task.load_report.loaded


def test_features_from_rejects_data_without_its_features(own_cohort, pretrained_checkpoint):
    import anndata as ad

    adata = ad.read_h5ad(own_cohort.omics["rna"])
    adata[:, [n for n in adata.var_names if n != "RNA3"]].copy().write_h5ad(own_cohort.omics["rna"])
    dm = labelled_datamodule(own_cohort, SurvivalTargets(event_column="os_event"))
    dm.features_from = str(pretrained_checkpoint)
    with pytest.raises(InputError, match=r"rna\.h5ad \(modality 'rna'\) lacks 1 of the 36 features of the checkpoint \(for example \['RNA3'\]\)"):
        dm.setup()
