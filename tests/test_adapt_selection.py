"""Unsupervised model selection inside the adaptation stage: every (method, epoch) candidate is scored by the
entropy / SND / DEV / IWCV scorers without target labels, the configured scorer's pick is saved as the chosen
model, and the offline oracle (target labels, reporting only) is reported next to each pick.

One tiny workspace per module (synthetic cohort → ingest → fine-tune → adapt), on a test-sized timm network."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from medtl import stages
from medtl.config import AdaptConfig, PipelineConfig, load_config
from medtl.models import create_backbone
from medtl.select.unsupervised import UNSUPERVISED_SCORES, ensemble_agreement_scores
from medtl.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["source_only", "adabn", "tent", "coral"]
EPOCHS = 2
CANDIDATES = ["source_only@epoch1", "source_only@epoch2", "adabn", "tent@epoch1", "tent@epoch2", "coral@epoch1",
              "coral@epoch2"]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, Workspace, dict]:
    root = tmp_path_factory.mktemp("adapt_selection")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTL_CACHE", str(root / "cache"))
        # test_efficientnet: timm's test-sized EfficientNet (BatchNorm, so AdaBN and TENT apply), ~4x faster
        config = load_config(ROOT / "configs" / "tiny.yaml", {
            "workdir": str(root / "run"), "finetune": {"backbone": "test_efficientnet.scratch", "freeze_groups": 0},
            "adapt": {"methods": METHODS, "train": {"epochs": EPOCHS, "batch_size": 8, "progress": False}}})
        ws = Workspace(config.workdir)
        stages.run_synth(config.synth, ws)
        stages.run_ingest(config.ingest, ws)
        stages.run_finetune(config.finetune, config.data, ws)
        result = stages.run_adapt(config.adapt, config.data, ws)
    return config, ws, result


def _copy(ws: Workspace, root: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A copy of the module's adapted workspace at ``root``, for a test that re-runs a stage in it."""
    copy = Workspace(root)
    shutil.copytree(ws.root, copy.root, ignore=shutil.ignore_patterns("dicom"))
    monkeypatch.setenv("MEDTL_CACHE", str(root.parent / "cache"))
    return copy


def read(ws: Workspace, name: str) -> dict:
    return json.loads((ws.adapt / name).read_text())


def test_selection_json_has_every_scorer_every_candidate_and_the_oracle(adapted) -> None:
    config, ws, result = adapted
    selection = read(ws, "selection.json")
    assert selection["scorer"] == config.adapt.selection_scorer == "ensv"
    assert "never influences a pick" in selection["note"] and selection["oracle"]["uses_target_labels"] is True
    assert [row["candidate"] for row in selection["candidates"]] == CANDIDATES
    assert [row["final"] for row in selection["candidates"]] == [False, True, True, False, True, False, True]
    assert selection["not_evaluated"] == []
    assert set(selection["picks"]) == set(selection["rankings"]) == set(UNSUPERVISED_SCORES)

    auc = {row["candidate"]: row["target_auc"] for row in selection["candidates"]}
    oracle = selection["oracle"]
    assert oracle["candidate"] == max(auc, key=lambda name: auc[name]) and oracle["target_auc"] == max(auc.values())
    for score, pick in selection["picks"].items():
        ranking = selection["rankings"][score]
        assert sorted(ranking) == sorted(CANDIDATES) and pick["candidate"] == ranking[0]
        row = next(r for r in selection["candidates"] if r["candidate"] == pick["candidate"])
        assert pick["score"] == row[score] == max(r[score] for r in selection["candidates"])
        assert (pick["method"], pick["epoch"], pick["target_auc"]) == (row["method"], row["epoch"], row["target_auc"])
        assert pick["auc_gap_to_oracle"] == pytest.approx(oracle["target_auc"] - row["target_auc"])
        assert pick["auc_gap_to_oracle"] >= 0 and ranking[pick["oracle_rank"] - 1] == oracle["candidate"]

    # the oracle's AUC of each final model is the one the stage reports from predictions.parquet
    summary = read(ws, "summary.json")
    for row in selection["candidates"]:
        if row["final"]:
            assert row["target_auc"] == pytest.approx(summary["target_auc"][row["method"]])
    inputs = selection["inputs"]
    manifest = stages.load_split_manifest(ws, config.data)
    target = manifest[manifest["role"] == "target"]
    assert inputs["target_unlabeled_images"] == (target["split"] == "unlabeled").sum()
    assert inputs["target_labeled_images"] == target["label"].notna().sum()
    assert inputs["source_val_images"] == ((manifest["role"] == "source") & (manifest["split"] == "val")).sum() > 0


def test_every_candidate_score_is_finite_or_null_with_a_reason(adapted) -> None:
    _, ws, _ = adapted
    for row in read(ws, "selection.json")["candidates"]:
        for score in UNSUPERVISED_SCORES:
            value = row[score]
            assert (value is not None and math.isfinite(value)) or row["not_scored"].get(score), (row, score)
        assert row["target_auc"] is None or 0.0 <= row["target_auc"] <= 1.0


def test_summary_and_return_value_name_the_chosen_candidate(adapted) -> None:
    config, ws, result = adapted
    selection, summary = read(ws, "selection.json"), read(ws, "summary.json")
    chosen = selection["chosen"]
    assert chosen["candidate"] == selection["picks"]["ensv"]["candidate"]
    assert summary["chosen"] == result["chosen"] == {"method": chosen["method"], "epoch": chosen["epoch"],
                                                     "scorer": "ensv"}
    assert summary["selection"] == result["selection"]
    assert summary["selection"]["n_candidates"] == len(CANDIDATES) and summary["selection"]["file"] == "selection.json"
    assert set(summary["selection"]["picks"]) == set(UNSUPERVISED_SCORES)
    assert summary["selection"]["oracle"]["method"] == selection["oracle"]["method"]
    # selection adds files; it changes no method's predictions
    predictions = pd.read_parquet(ws.adapt / "predictions.parquet")
    assert sorted(predictions["model"].unique()) == sorted(METHODS)


def test_the_chosen_model_loads_and_is_the_chosen_candidate(adapted) -> None:
    _, ws, _ = adapted
    chosen = read(ws, "selection.json")["chosen"]
    model, info = stages.load_adapted(ws)
    assert (info["method"], info["epoch"], info["scorer"]) == (chosen["method"], chosen["epoch"], "ensv")
    assert info["score"] == pytest.approx(chosen["score"])
    source = (ws.adapt / f"{chosen['method']}.safetensors" if chosen["epoch"] is None
              else ws.adapt / "candidates" / f"{chosen['method']}-epoch{chosen['epoch']}.safetensors")
    expected = load_file(str(source))
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k].cpu(), expected[k]) for k in expected)
    reference = create_backbone(info["backbone"], num_classes=info["num_classes"])
    reference.load_state_dict(expected)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.cpu()(x), reference.eval()(x))


def test_the_picks_never_read_target_labels(adapted, tmp_path, monkeypatch) -> None:
    """Flip every target label and run the stage again: each fit resumes its finished checkpoint and every
    candidate is re-evaluated from its saved weights. The oracle's AUCs flip (it reads the labels), the
    scores and picks stay exactly the same (they do not)."""
    config, ws, _ = adapted
    before = read(ws, "selection.json")
    copy = _copy(ws, tmp_path / "flipped", monkeypatch)
    split_manifest = stages.load_split_manifest

    def flipped_target_labels(w: Workspace, data) -> pd.DataFrame:
        manifest = split_manifest(w, data)
        flip = (manifest["role"] == "target") & manifest["label"].notna()
        manifest.loc[flip, "label"] = 1 - manifest.loc[flip, "label"]
        return manifest

    monkeypatch.setattr(stages, "load_split_manifest", flipped_target_labels)
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    stages.run_adapt(config.adapt, config.data, copy)
    after = read(copy, "selection.json")

    assert after["picks"].keys() == before["picks"].keys()
    for score in UNSUPERVISED_SCORES:
        assert after["rankings"][score] == before["rankings"][score]
        assert after["picks"][score]["candidate"] == before["picks"][score]["candidate"]
    assert after["chosen"]["candidate"] == before["chosen"]["candidate"]
    for old, new in zip(before["candidates"], after["candidates"], strict=True):
        for score in UNSUPERVISED_SCORES:
            assert new[score] == pytest.approx(old[score], rel=1e-6, abs=1e-9), (old["candidate"], score)
        assert new["target_auc"] == pytest.approx(1.0 - old["target_auc"])  # the labels did change


def _candidate(method: str, epoch: int | None, rng: np.random.Generator, source: bool = True,
               auc: float = 0.5) -> stages.AdaptCandidate:
    probabilities = rng.dirichlet([1.0, 1.0], size=12)
    arrays = {"target_probabilities": probabilities, "target_features": rng.normal(size=(12, 4))}
    if source:
        arrays |= {"source_val_features": rng.normal(size=(10, 4)), "source_val_losses": rng.uniform(0, 1, 10)}
    return stages.AdaptCandidate(method, epoch, True, Path(f"{method}.safetensors"), arrays, auc)


def test_select_adapted_reports_missing_scores_and_refuses_an_unscorable_choice() -> None:
    rng = np.random.default_rng(0)
    candidates = [_candidate("source_only", 1, rng, auc=0.6), _candidate("tent", 1, rng, source=False, auc=0.7)]
    selection = stages.select_adapted(candidates, "snd", oracle_unavailable=None)
    tent = selection["candidates"][1]
    assert tent["dev"] is None and tent["iwcv"] is None and "missing source_val_features" in tent["not_scored"]["dev"]
    assert selection["picks"]["dev"]["candidate"] == "source_only@epoch1"  # the only candidate dev can score
    assert selection["oracle"]["candidate"] == "tent@epoch1"

    with pytest.raises(ValueError, match="selection_scorer"):
        stages.select_adapted([candidates[1]], "dev")
    no_labels = stages.select_adapted([_candidate("adabn", None, rng, auc=float("nan"))], "entropy",
                                      oracle_unavailable="the target hospital has no labeled images")
    assert no_labels["oracle"]["candidate"] is None and "no labeled images" in no_labels["oracle"]["reason"]
    assert no_labels["picks"]["entropy"]["auc_gap_to_oracle"] is None
    assert no_labels["candidates"][0]["candidate"] == "adabn" and no_labels["candidates"][0]["epoch"] is None


def test_selection_scorer_is_validated() -> None:
    assert AdaptConfig().selection_scorer == "ensv"
    assert AdaptConfig(selection_scorer="snd").selection_scorer == "snd"
    with pytest.raises(ValueError, match="selection_scorer"):
        AdaptConfig(selection_scorer="oracle")


def test_a_list_of_reg_values_trains_each_loss_plugin_once_per_value(adapted, tmp_path, monkeypatch) -> None:
    """Several adaptation-loss weights widen the candidate pool (Hu et al. 2024 select over each method's
    hyper-parameters too): every loss plugin trains once per value under its own name, the other methods once."""
    config, ws, _ = adapted
    copy = _copy(ws, tmp_path / "regs", monkeypatch)
    cfg = config.adapt.model_copy(update={"methods": ["source_only", "tent", "coral"], "reg": [0.5, 2.0]})
    assert [r for r, _, _ in stages.adaptation_runs(cfg)] == ["source_only", "tent", "coral-reg0.5", "coral-reg2"]

    stages.run_adapt(cfg, config.data, copy)
    selection, summary = read(copy, "selection.json"), read(copy, "summary.json")
    runs = ["source_only", "tent", "coral-reg0.5", "coral-reg2"]
    assert [row["candidate"] for row in selection["candidates"]] == [
        f"{run}@epoch{e}" for run in runs for e in range(1, EPOCHS + 1)]
    assert summary["methods"] == runs and summary["reg"] == [0.5, 2.0]
    assert [summary["details"][run].get("reg") for run in runs] == [None, None, 0.5, 2.0]
    assert sorted(pd.read_parquet(copy.adapt / "predictions.parquet")["model"].unique()) == sorted(runs)
    weak, strong = (load_file(str(copy.adapt / f"coral-reg{r}.safetensors")) for r in ("0.5", "2"))
    assert any(not torch.equal(weak[k], strong[k]) for k in weak if weak[k].is_floating_point())

    # the saved target probabilities give back EnsV's scores, and its pick over any sub-pool without inference
    probabilities = load_file(str(copy.adapt / "target_probabilities.safetensors"))
    names = [row["candidate"] for row in selection["candidates"]]
    assert sorted(probabilities) == sorted(names)
    ensv = ensemble_agreement_scores([probabilities[n].numpy() for n in names])
    np.testing.assert_allclose(ensv, [row["ensv"] for row in selection["candidates"]])


@pytest.mark.parametrize("reg, message", [([], "one or more distinct"), ([1.0, 1.0], "one or more distinct"),
                                          ([0.5, -1.0], "greater than or equal to 0")])
def test_reg_values_are_checked(reg, message) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        AdaptConfig(reg=reg)
    assert AdaptConfig(reg=0.3).reg_values == [0.3] and AdaptConfig(reg=[0.3, 1]).reg_values == [0.3, 1.0]


def test_adaptation_resumes_only_runs_adapted_from_the_same_fine_tuned_weights(adapted, tmp_path, monkeypatch) -> None:
    """Fine-tuning again (another strategy, other data) keeps the backbone's name but changes its weights: the
    adaptation runs must start from the new weights, not resume checkpoints adapted from the old ones."""
    config, ws, _ = adapted
    copy = _copy(ws, tmp_path / "rerun", monkeypatch)
    cfg = config.adapt.model_copy(update={"methods": ["coral"]})
    adapted_before = load_file(str(ws.adapt / "coral.safetensors"))

    stages.run_adapt(cfg, config.data, copy)  # same fine-tuned weights: the finished run is taken as it is
    same = load_file(str(copy.adapt / "coral.safetensors"))
    assert all(torch.equal(same[k], adapted_before[k]) for k in same)

    tuned = load_file(str(copy.finetune / "model.safetensors"))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tuned.items()},
              str(copy.finetune / "model.safetensors"))
    stages.run_adapt(cfg, config.data, copy)
    again = load_file(str(copy.adapt / "coral.safetensors"))
    assert any(not torch.equal(again[k], adapted_before[k]) for k in again if again[k].is_floating_point())


def test_adaptation_trains_with_the_class_weights_the_model_was_fine_tuned_with(adapted, tmp_path, monkeypatch) -> None:
    config, ws, _ = adapted
    copy = _copy(ws, tmp_path / "weighted", monkeypatch)
    card_path = copy.finetune / "model.json"
    card = json.loads(card_path.read_text())
    assert card["class_weights"] is None  # this module's fine-tuning was unweighted: weigh it as if it were not
    card_path.write_text(json.dumps({**card, "class_weights": [2.0, 0.5]}))
    seen = []
    real_fit = stages.fit

    def recording_fit(model, objective, *args, **kwargs):
        seen.append(objective.task.class_weights)
        return real_fit(model, objective, *args, **kwargs)

    monkeypatch.setattr(stages, "fit", recording_fit)
    stages.run_adapt(config.adapt.model_copy(update={"methods": ["coral"]}), config.data, copy)
    assert [w.tolist() for w in seen] == [[2.0, 0.5]]
    weighted, plain = (load_file(str(w.adapt / "coral.safetensors")) for w in (copy, ws))
    assert any(not torch.equal(weighted[k], plain[k]) for k in weighted if weighted[k].is_floating_point())


def test_plugin_settings_reach_the_plugin_and_the_summary(adapted, tmp_path, monkeypatch) -> None:
    config, ws, _ = adapted
    copy = _copy(ws, tmp_path / "settings", monkeypatch)
    built = []
    real = stages.build_adaptation_loss
    monkeypatch.setattr(stages, "build_adaptation_loss", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = config.adapt.model_copy(update={"methods": ["dann"], "plugin_settings": {"dann": {"alpha": 0.5}}})
    stages.run_adapt(cfg, config.data, copy)
    assert [type(p).__name__ for p in built] == ["DANNLoss"] and built[0].alpha == 0.5
    assert read(copy, "summary.json")["details"]["dann"]["settings"] == {"alpha": 0.5}


@pytest.mark.parametrize("settings, message", [
    ({"coral": {"x": 1}}, "adaptation loss 'coral' has no setting 'x'; its settings are none"),
    ({"pseudo_label": {"threshold": 2}}, "plugin_settings.pseudo_label: threshold is a softmax probability"),
    ({"mmd": {"bandwidths": [1.0]}}, "does not run; add it to methods"),
    ({"tent": {"lr": 1}}, "tent is not a loss plugin")])
def test_plugin_settings_are_checked(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptConfig(methods=["source_only", "tent", "coral", "pseudo_label"], plugin_settings=settings)
