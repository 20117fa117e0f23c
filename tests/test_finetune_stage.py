"""The fine-tune stage: each strategy through ``run_finetune`` on one tiny ingested cohort, the card's fields,
early stopping, BatchNorm policies and the negative-transfer gate (CPU; 16-pixel images, 1-2 epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from medtl import stages
from medtl.config import ConfigError, DataConfig, FinetuneConfig, SelectConfig, TrainConfig, load_config
from medtl.finetune import apply_batchnorm_policy
from medtl.models import create_backbone
from medtl.train.inference import positive_probability
from medtl.workspace import Workspace

from tests.conftest import TINY_SOURCE as SOURCE
from tests.conftest import TINY_TARGET as TARGET
from tests.conftest import ingest_two_hospital_cohort, run_folder_sharing_ingest

BACKBONE = "efficientnet_lite0.imagenet"
DATA = DataConfig(source_hospitals=[SOURCE], target_hospital=TARGET, image_size=16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    yield from ingest_two_hospital_cohort(tmp_path_factory)


def _workspace(cohort: Workspace, tmp_path: Path) -> Workspace:
    return run_folder_sharing_ingest(cohort, tmp_path / "run")


def _config(epochs: int = 1, **settings) -> FinetuneConfig:
    train = TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, device="cpu", progress=False)
    return FinetuneConfig(backbone=settings.pop("backbone", BACKBONE), train=train, **settings)


def _check_saved_model(ws: Workspace) -> tuple[torch.nn.Module, dict]:
    """The saved model loads as a plain backbone and reproduces the stage's predictions."""
    model, card = stages.load_finetuned(ws)
    assert not any("lora" in key for key in model.state_dict())
    predictions = pd.read_parquet(ws.finetune / "predictions.parquet")
    rows = stages.evaluation_rows(stages.load_split_manifest(ws, DATA))
    prob = positive_probability(model, stages._eval_loader(rows, model, DATA))
    torch.testing.assert_close(torch.as_tensor(prob), torch.tensor(predictions["prob"].to_numpy()),
                               atol=1e-5, rtol=1e-4)
    assert json.loads((ws.finetune / "model.json").read_text()) == card
    return model, card


def _group_sizes(name: str = BACKBONE) -> list[int]:
    model = create_backbone(name, num_classes=2)
    params = dict(model.named_parameters())
    return [sum(params[n].numel() for n in group) for group in model.layer_groups()]


@pytest.fixture(scope="module")
def group_sizes(cohort: Workspace) -> list[int]:
    return _group_sizes()


# strategy, its settings, epochs
CASES = {
    "full": ({}, 1),
    "linear_probe": ({}, 1),
    "freeze": ({"freeze_groups": 3}, 1),
    "gradual_unfreeze": ({"unfreeze_every": 1, "batchnorm": "frozen"}, 2),
    "lp_ft": ({"lp_epochs": 1}, 2),
    "l2sp": ({"l2sp_alpha": 0.1}, 1),
    "lora": ({"lora_rank": 2}, 1),
}


@pytest.mark.parametrize("strategy", list(CASES))
def test_each_strategy_saves_a_loadable_model_and_a_truthful_card(strategy, cohort, group_sizes, tmp_path):
    settings, epochs = CASES[strategy]
    ws = _workspace(cohort, tmp_path)
    summary = stages.run_finetune(_config(epochs, strategy=strategy, **settings), DATA, ws)
    model, card = _check_saved_model(ws)
    assert summary == {k: v for k, v in card.items() if k != "history"}
    total, head, n = sum(group_sizes), group_sizes[-1], len(group_sizes)
    assert card["strategy"] == strategy and card["backbone"] == card["selected_backbone"] == BACKBONE
    assert card["n_groups"] == n and card["epochs_trained"] == len(card["history"]) == epochs
    assert card["best_epoch"] in range(1, epochs + 1) and 0 <= card["best_val_auc"] <= 1
    assert card["best_val_auc"] == max(h["val_auc"] for h in card["history"])
    assert card["early_stopping"] is None
    assert card["negative_transfer"] == {
        "checked": False, "transfer_val_auc": card["val_auc"], "scratch_val_auc": None, "delta": None,
        "negative": None, "message": "not checked: finetune.scratch_baseline is false", "fallback_applied": False}
    assert not (ws.finetune / "scratch_baseline.json").exists()
    trained, frozen = card["trainable_params"], card["frozen_groups"]
    if strategy in ("full", "l2sp", "lp_ft"):
        assert (trained, card["total_params"], frozen) == (total, total, 0)
    elif strategy == "linear_probe":
        assert (trained, card["total_params"], frozen) == (head, total, n - 1)
        assert card["strategy_settings"] == {"freeze_groups": "all", "layer_decay": 1.0}
    elif strategy == "freeze":
        assert (trained, frozen) == (total - sum(group_sizes[:3]), 3)
    elif strategy == "gradual_unfreeze":
        assert [h["trainable_groups"] for h in card["history"]] == [1, 2]
        assert (trained, frozen) == (head + group_sizes[-2], n - 2)
        # batchnorm: frozen survives unfreezing: every running statistic is still the pretrained one
        pretrained = create_backbone(BACKBONE, num_classes=2).state_dict()
        for key, value in model.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(value, pretrained[key])
    if strategy == "lp_ft":
        assert [(h["epoch"], h["phase"]) for h in card["history"]] == [(1, "probe"), (2, "finetune")]
        assert card["strategy_settings"] == {"lp_epochs": 1, "finetune_epochs": 1, "layer_decay": 1.0}
    if strategy == "l2sp":
        assert card["history"][0]["l2sp"] > 0 and card["strategy_settings"]["weight_decay"] == 0.0
    if strategy == "lora":
        # adapters + classifier train; the count is taken before merging, so the total includes the adapters
        assert head < trained < total < card["total_params"]
        assert card["strategy_settings"]["lora_rank"] == 2 and card["strategy_settings"]["adapted_layers"] > 10


def test_adabn_statistics_are_reestimated_on_the_source_and_kept_through_full_training(cohort, tmp_path):
    ws = _workspace(cohort, tmp_path)
    stages.run_finetune(_config(1, batchnorm="adabn"), DATA, ws)
    model, card = _check_saved_model(ws)
    assert card["batchnorm"] == "adabn"
    expected = create_backbone(BACKBONE, num_classes=2)
    manifest = stages.load_split_manifest(ws, DATA)
    train = manifest[(manifest["role"] == "source") & (manifest["split"] == "train")]
    with torch.no_grad():
        apply_batchnorm_policy(expected, "adabn", (b["image"] for b in stages._eval_loader(train, expected, DATA)))
    reference, imagenet = expected.state_dict(), create_backbone(BACKBONE, num_classes=2).state_dict()
    key = next(k for k in reference if k.endswith("running_mean"))
    assert not torch.allclose(reference[key], imagenet[key])  # re-estimated, not the pretrained statistics
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, reference[key])


def _constant_auc(monkeypatch: pytest.MonkeyPatch, auc_of) -> None:
    """Replace the validation AUC (not the probabilities) by ``auc_of(model)``."""
    real = stages._validation_scores

    def scores(model, loader, y):
        prob, _ = real(model, loader, y)
        return prob, auc_of(model)

    monkeypatch.setattr(stages, "_validation_scores", scores)


def test_early_stopping_ends_before_the_last_epoch(cohort, tmp_path, monkeypatch):
    # Constructed case: the validation AUC is forced flat (monkeypatched), so epoch 2 does not improve on epoch 1.
    _constant_auc(monkeypatch, lambda model: 0.5)
    ws = _workspace(cohort, tmp_path)
    stages.run_finetune(_config(3, early_stopping_patience=1), DATA, ws)
    _, card = _check_saved_model(ws)
    assert card["early_stopping"] == {"monitor": "val_auc", "patience": 1, "stopped_epoch": 2}
    assert card["epochs_trained"] == 2 < card["epochs"] == 3
    assert (card["best_epoch"], card["best_val_auc"]) == (1, 0.5)


@pytest.mark.parametrize("on_negative_transfer", ["warn", "fallback"])
def test_negative_transfer_gate(on_negative_transfer, cohort, tmp_path, monkeypatch):
    # Forced: validation AUC is monkeypatched to 0.9 for the scratch model and 0.6 for the transferred one.
    _constant_auc(monkeypatch, lambda model: 0.9 if model.cfg.tag == "scratch" else 0.6)
    ws = _workspace(cohort, tmp_path)
    stages.run_finetune(_config(1, strategy="linear_probe", scratch_baseline=True,
                                on_negative_transfer=on_negative_transfer), DATA, ws)
    model, card = _check_saved_model(ws)
    gate = card["negative_transfer"]
    fallback = on_negative_transfer == "fallback"
    assert gate["checked"] and gate["negative"] and gate["fallback_applied"] == fallback
    assert (gate["transfer_val_auc"], gate["scratch_val_auc"]) == (0.6, 0.9)
    assert gate["delta"] == pytest.approx(-0.3) and "negative transfer" in gate["message"]
    assert gate["scratch_backbone"] == "efficientnet_lite0.scratch"
    baseline = json.loads((ws.finetune / "scratch_baseline.json").read_text())
    assert baseline["backbone"] == "efficientnet_lite0.scratch" and len(baseline["history"]) == 1
    assert card["selected_backbone"] == BACKBONE and card["strategy"] == "linear_probe"
    assert card["backbone"] == ("efficientnet_lite0.scratch" if fallback else BACKBONE)
    assert ("fallback" in card["saved_model"]) == fallback and card["val_auc"] == (0.9 if fallback else 0.6)
    # the saved stem is the scratch model's (random, trained) or the probe's (frozen ImageNet weights)
    stem = next(k for k in model.state_dict() if k.endswith("conv_stem.weight"))
    imagenet = create_backbone(BACKBONE, num_classes=2).state_dict()[stem]
    assert torch.equal(model.state_dict()[stem], imagenet) != fallback


def test_balanced_class_weights_come_from_the_source_training_labels_and_reach_the_card(cohort, tmp_path):
    ws = _workspace(cohort, tmp_path)
    stages.run_finetune(_config(1, class_weight="balanced"), DATA, ws)
    _, card = _check_saved_model(ws)
    manifest = stages.load_split_manifest(ws, DATA)
    labels = manifest[(manifest["role"] == "source") & (manifest["split"] == "train")]["label"].astype(int)
    counts = labels.value_counts()
    assert card["class_weights"] == pytest.approx([len(labels) / (2 * counts[c]) for c in (0, 1)])
    plain = run_folder_sharing_ingest(cohort, tmp_path / "plain")
    stages.run_finetune(_config(1), DATA, plain)
    _, plain_card = _check_saved_model(plain)
    assert plain_card["class_weights"] is None
    # the loss differs, so the weighted run's first epoch must too (and no checkpoint of one resumes the other)
    assert card["history"][0]["loss"] != plain_card["history"][0]["loss"]


def test_selection_validation_mode_fine_tunes_every_candidate_and_scores_each_ranking(cohort, tmp_path):
    ws = _workspace(cohort, tmp_path)
    candidates = [BACKBONE, "efficientnet_lite0.scratch"]
    validation = FinetuneConfig(strategy="linear_probe", train=_config().train)
    result = stages.run_select(SelectConfig(candidates=candidates, validation=validation), DATA, ws)
    report = json.loads((ws.select / "validation.json").read_text())
    assert result["validation"] == report and json.loads((ws.select / "ranking.json").read_text()) == result
    assert sorted(report["finetuned"]) == sorted(candidates)
    aucs = {name: run["val_auc"] for name, run in report["finetuned"].items()}
    assert all(0 <= auc <= 1 for auc in aucs.values()) and len(set(aucs.values())) == 2
    assert all(run["seconds"] > 0 and run["strategy"] == "linear_probe" for run in report["finetuned"].values())
    rows = {row["score"]: row for row in report["scores"]}
    assert {"logme", "h_score", "linear_probe_auc", "knn_accuracy"} <= rows.keys()
    logme = rows["logme"]
    assert logme["top_pick"] == result["best"]  # rank_by logme: the stage's choice is LogME's pick
    assert logme["n_candidates"] == 2 and logme["weighted_tau"] in (-1.0, 1.0)
    assert logme["regret"] == pytest.approx(max(aucs.values()) - aucs[logme["top_pick"]])
    assert logme["top_pick_within_tolerance"] == (logme["regret"] <= 0.01 + 1e-9)
    assert logme["finetune_seconds"] == pytest.approx(sum(r["seconds"] for r in report["finetuned"].values()))
    assert rows["leep"]["n_candidates"] == 1  # only the ImageNet candidate has a source head
    assert set(report["feature_seconds"]) == set(candidates)
    # the validation runs keep their checkpoints apart from the fine-tune stage's
    assert all((ws.select / "validation" / name).is_dir() for name in candidates)
    assert not (ws.finetune / "checkpoints").exists()


def test_strategy_config_keeps_old_configs_and_explains_mistakes(tmp_path):
    assert FinetuneConfig(freeze_groups=2).strategy == "freeze"  # configs from before `strategy` existed
    assert FinetuneConfig(freeze_groups="all").strategy == "linear_probe"
    assert FinetuneConfig().strategy == "full"
    bad = {"strategy: full\n  freeze_groups: 2": "set strategy: freeze",
           "strategy: lora\n  lp_epochs: 3": "lp_epochs=3 only applies to strategy 'lp_ft'",
           "strategy: linear_probe\n  layer_decay: 0.5": "layer_decay has no effect",
           "strategy: lp_ft\n  lp_epochs: 8": "make lp_epochs smaller than train.epochs",
           "on_negative_transfer: fallback": "set scratch_baseline: true",
           "class_weight: [1.0, 2.0, 3.0]": "give one weight per class"}
    bad_select = {"validation: {backbone: efficientnet_lite0.imagenet}": "its backbone must stay null",
                  "validation: {scratch_baseline: true}": "add <arch>.scratch to select.candidates"}
    cases = [("finetune", text, message) for text, message in bad.items()]
    cases += [("select", text, message) for text, message in bad_select.items()]
    for section, text, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(f"{section}:\n  {text}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_leave_one_hospital_out_trains_on_the_others_and_tests_on_the_unseen_one(cohort, tmp_path, monkeypatch):
    ws = _workspace(cohort, tmp_path)
    trained_on = []
    original = stages._finetune_one

    def spy(name, cfg, data, train_rows, val_rows, ws_, role):
        trained_on.append((set(train_rows["hospital"]), set(val_rows["hospital"]), role))
        return original(name, cfg, data, train_rows, val_rows, ws_, role)

    monkeypatch.setattr(stages, "_finetune_one", spy)
    summary = stages.run_leave_one_hospital_out(_config(), DATA, ws, n_bootstrap=20)
    # held out in name order (Harbor Valley, then St. Aurelia), each trained on the other
    assert trained_on == [({SOURCE}, {SOURCE}, "loho-0"), ({TARGET}, {TARGET}, "loho-1")]
    assert list(summary["held_out"]) == [TARGET, SOURCE]
    assert summary["confidence"] == 0.95  # the default level, recorded for the report
    manifest = stages.load_split_manifest(ws, DATA)
    for hospital, result in summary["held_out"].items():
        assert result["train_hospitals"] == sorted({SOURCE, TARGET} - {hospital})
        assert result["test_images"] == int((manifest["hospital"] == hospital).sum()) == 32
        assert 0 <= result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1] <= 1
    predictions = pd.read_parquet(ws.loho / "predictions.parquet")
    assert predictions.groupby("model")["hospital"].unique().map(list).to_dict() == {
        f"loho:{SOURCE}": [SOURCE], f"loho:{TARGET}": [TARGET]}
    assert json.loads((ws.loho / "summary.json").read_text()) == json.loads(json.dumps(summary))

    lonely = _workspace_with(cohort, tmp_path / "one", lambda m: m[m["hospital"] == SOURCE])
    with pytest.raises(ValueError, match="at least two hospitals"):
        stages.run_leave_one_hospital_out(_config(), DATA.model_copy(update={"target_hospital": SOURCE}), lonely)


def _workspace_with(cohort: Workspace, root: Path, edit) -> Workspace:
    """A run folder whose manifest is an edited copy of the module's."""
    from medtl.ingest.manifest import read_manifest, write_table_atomic

    ws = Workspace(root)
    ws.ingest.mkdir(parents=True)
    frame = edit(read_manifest(cohort))
    frame["image"] = [str((cohort.ingest / p).resolve()) for p in frame["image"]]
    write_table_atomic(frame, ws.manifest)
    return ws
