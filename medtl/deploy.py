"""The deployed model: the one model the pipeline hands over, and the one the validation report describes.

Which model is deployed is decided here, once (:func:`deployed_origin`): the adapt stage's label-free pick
(``adapt/chosen.safetensors``) when adaptation ran on the current fine-tuned model, else the fine-tuned model
(which is itself the scratch model after a negative-transfer fallback). :func:`run_deploy` then sets how it is used,
from the source hospitals' validation split only:

* optional recalibration (``report.recalibrate``: temperature scaling, Guo et al. 2017, or bias-corrected
  temperature scaling, Alexandari et al. 2020);
* the operating threshold (Youden index of the recalibrated probabilities);
* at the target hospital, the estimated prevalence of the finding from its *unlabeled* images (BBSE, Lipton et
  al. 2018; EM, Saerens et al. 2002) and, with ``adapt.label_shift``, the prior correction of the probabilities
  there;

and writes ``deploy/model.safetensors`` (one file in the format of every medtl model, loadable by path with
:func:`medtl.models.load_model`; its card holds the threshold, the calibration and the correction),
``deploy/predictions.parquet`` (the deployed probabilities on every evaluated image, and the network's own) and
``deploy/analysis.json`` (label-shift estimates and label-free performance estimates per site, read by the
report). No target or external label is read by anything here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd

import medtl
from medtl import tracking
from medtl.adapt.label_shift import LabelShiftEstimator, prior_corrected
from medtl.config import PipelineConfig
from medtl.evaluate.calibration import TemperatureScaling, as_two_class
from medtl.evaluate.label_free import AgreementEstimator, ATCEstimator
from medtl.evaluate.metrics import youden_threshold
from medtl.evaluate.report import jsonable
from medtl.models import Backbone, load_model
from medtl.stages import (_eval_loader, _save_model, _write_json, _write_parquet, evaluation_rows, images_read,
                          load_adapted, load_finetuned, load_split_manifest)
from medtl.train.inference import positive_probability
from medtl.workspace import Workspace

log = logging.getLogger("medtl")

MODEL_NAME = "deployed"
"""The ``model`` of the deployed model's rows in ``deploy/predictions.parquet`` and the report."""
COMPARISON_MODEL = "finetuned"
"""The fine-tuned model before adaptation: the report's comparison row."""


@dataclass
class DeployedOrigin:
    """Which trained model is deployed, and why.

    Attributes:
        stage: ``adapt`` or ``finetune``.
        file: its file, relative to the workdir.
        description: one sentence for the report.
        notes: why another model was not deployed (adaptation not run, or run on an older fine-tuned model).
        details: the adapt stage's pick (candidate, method, epoch, scorer, fallback) or the fine-tuning card's
            ``saved_model`` sentence.
    """

    stage: str
    file: str
    description: str
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def deployed_origin(config: PipelineConfig, ws: Workspace) -> DeployedOrigin:
    """The rule: adapt's label-free pick when adaptation ran on the current fine-tuned weights, else the fine-tuned
    model.

    Args:
        config: the run's config (``data.target_hospital`` says whether adaptation applies).
        ws: the run's workspace.

    Returns:
        The :class:`DeployedOrigin`.

    Raises:
        FileNotFoundError: without a fine-tuned model.
    """
    from medtl.ingest.folder import file_sha256

    finetuned = ws.finetune / "model.safetensors"
    if not finetuned.exists():
        raise FileNotFoundError(f"{finetuned} not found: run `medtl finetune` first")
    card = json.loads(finetuned.with_suffix(".json").read_text())
    tuned = DeployedOrigin("finetune", "finetune/model.safetensors", f"the fine-tuned model: {card['saved_model']}",
                           details={"saved_model": card["saved_model"]})
    target = config.data.target_hospital
    if target is None:
        tuned.notes.append("single-hospital study (no target hospital): no adaptation")
        return tuned
    selection_path = ws.adapt / "selection.json"
    if not (selection_path.exists() and (ws.adapt / "chosen.safetensors").exists()):
        tuned.notes.append(f"adaptation to {target} has not run (medtl adapt): the fine-tuned model is deployed")
        return tuned
    selection = json.loads(selection_path.read_text())
    if selection.get("base_sha256") != file_sha256(finetuned) or selection.get("target_hospital") != target:
        tuned.notes.append(f"the adapted models in adapt/ were adapted from another fine-tuned model or to another "
                           f"hospital than {target}: re-run medtl adapt; meanwhile the fine-tuned model is deployed")
        return tuned
    chosen = selection["chosen"]
    epoch = f" after epoch {chosen['epoch']}" if chosen.get("epoch") is not None else ""
    how = (f"chosen without {target}'s labels by the {chosen['scorer']} score among {len(selection['candidates'])} "
           "adaptation candidates")
    details = {k: chosen.get(k) for k in ("candidate", "method", "epoch", "scorer", "score")}
    details["fallback"] = selection.get("fallback")
    return DeployedOrigin("adapt", "adapt/chosen.safetensors",
                          f"{chosen['method']}{epoch} adapted to {target}, {how}", details=details,
                          notes=[selection["fallback"]] if selection.get("fallback") else [])


def deploy_inputs(config: PipelineConfig, ws: Workspace, origin: DeployedOrigin | None = None) -> dict:
    """What the deployed model is made from: the trained model's file and content hash, the manifest's content and
    the settings of :func:`run_deploy`. A ``deploy/`` whose card records other inputs is out of date."""
    from medtl.ingest.folder import file_sha256

    origin = origin or deployed_origin(config, ws)
    return {"model_file": origin.file, "model_sha256": file_sha256(ws.root / origin.file),
            "manifest_sha256": file_sha256(ws.manifest),
            "settings": {"data": config.data.model_dump(mode="json"), "recalibrate": config.report.recalibrate,
                         "label_shift": config.adapt.label_shift, "n_bootstrap": config.report.n_bootstrap,
                         "confidence": config.report.confidence}}


def is_current(config: PipelineConfig, ws: Workspace) -> bool:
    """Whether ``deploy/`` holds the model :func:`deployed_origin` names, made from the current files and settings.

    Args:
        config: the run's config.
        ws: the run's workspace.

    Returns:
        False when ``deploy/`` is missing or any of :func:`deploy_inputs` changed since it was written.
    """
    card = ws.deploy / "model.json"
    if not (card.exists() and (ws.deploy / "predictions.parquet").exists() and (ws.deploy / "analysis.json").exists()):
        return False
    return json.loads(card.read_text()).get("inputs") == deploy_inputs(config, ws)


def _load(origin: DeployedOrigin, ws: Workspace) -> tuple[Backbone, dict]:
    return load_adapted(ws) if origin.stage == "adapt" else load_finetuned(ws)


@dataclass
class _Scored:
    """The deployed network's raw P(finding) on every image the deploy step reads, split by purpose."""

    source_val: np.ndarray
    target_unlabeled: np.ndarray
    evaluated: np.ndarray


def _score(model: Backbone, config: PipelineConfig, source_val: pd.DataFrame, target_unlabeled: pd.DataFrame,
           evaluated: pd.DataFrame) -> _Scored:
    rows = pd.concat([source_val, target_unlabeled, evaluated])
    prob = positive_probability(model, _eval_loader(rows, model, config.data), device=config.finetune.train.device)
    a, b = len(source_val), len(source_val) + len(target_unlabeled)
    return _Scored(prob[:a], prob[a:b], prob[b:])


def _calibrate(method: str, source_prob: np.ndarray, source_labels: np.ndarray) -> TemperatureScaling | None:
    if method == "none":
        return None
    return TemperatureScaling(bias=method == "bcts").fit(source_prob, source_labels)


def _apply(calibration: TemperatureScaling | None, prob: np.ndarray) -> np.ndarray:
    return prob if calibration is None or len(prob) == 0 else calibration.transform(prob)


def _correct(prob: np.ndarray, assumed_prior: float, target_prior: float) -> np.ndarray:
    """Re-weight P(finding) from the prevalence the probabilities reflect to the target's (Saerens et al. 2002)."""
    if len(prob) == 0:
        return prob
    return prior_corrected(as_two_class(prob), np.array([1 - assumed_prior, assumed_prior]),
                           np.array([1 - target_prior, target_prior]))[:, 1]


def _estimate_prevalence(method: str, source_prob: np.ndarray, source_labels: np.ndarray, source_groups: np.ndarray,
                         site_prob: np.ndarray, site_groups: np.ndarray, config: PipelineConfig) -> dict:
    estimator = LabelShiftEstimator(method=method, n_bootstrap=config.report.n_bootstrap,
                                    confidence=config.report.confidence, seed=0)
    try:
        estimator.fit(source_prob, source_labels, site_prob, source_groups=source_groups, target_groups=site_groups)
    except ValueError as exc:  # e.g. BBSE's confusion matrix is singular: say why instead of failing
        return {"method": method, "prevalence": None, "ci_low": None, "ci_high": None, "reason": str(exc)}
    return {"method": method, "prevalence": float(estimator.target_prior_[1]),
            "ci_low": _finite(estimator.ci_low_[1]), "ci_high": _finite(estimator.ci_high_[1]),
            "source_prevalence": float(estimator.source_prior_[1]), "calibrated": estimator.calibration_ is not None,
            "n_images": int(len(site_prob))}


def _label_shift_correction(config: PipelineConfig, prevalence: dict[str, dict], assumed_prior: float,
                            calibrated: bool) -> dict:
    """``adapt.label_shift`` at the target: the card's block saying whether and how the deployed probabilities there
    are re-weighted to the target's estimated prevalence (``target_prior``)."""
    target = config.data.target_hospital
    block = {"method": config.adapt.label_shift, "applied": False, "hospital": target}
    if config.adapt.label_shift == "none" or target not in prevalence:
        return block
    chosen = prevalence[target][config.adapt.label_shift]
    if chosen["prevalence"] is None:
        return {**block, "reason": f"not applied: {chosen['reason']}"}
    if prevalence[target]["inconsistent"]:
        return {**block, "reason": f"not applied: {prevalence[target]['inconsistent']}"}
    block.update(applied=True, assumed_prior=assumed_prior, target_prior=chosen["prevalence"],
                 interval=[chosen["ci_low"], chosen["ci_high"]],
                 rule=f"at {target}, P(finding) is re-weighted from prevalence {assumed_prior:.3f} (what the deployed "
                      f"probabilities reflect on the source validation split) to the estimated "
                      f"{chosen['prevalence']:.3f} (Saerens et al. 2002); the threshold applies to the corrected "
                      "probabilities")
    if not calibrated:
        block["note"] = "the correction assumes calibrated probabilities; set report.recalibrate: bcts (or temperature)"
    return block


LABEL_SHIFT_EDGE = 0.01
"""An estimated prevalence within this of 0 or 1 is the estimator running into its bound, not a measurement."""


def label_shift_inconsistency(bbse: dict, em: dict) -> str | None:
    """Why the two prevalence estimates of one site cannot both hold (None when they can).

    Under label shift alone (the images of each class look alike at both hospitals) BBSE and EM estimate the same
    prevalence, so intervals that do not overlap, or an estimate at 0 or 1, say that the images differ in more than
    prevalence: neither estimate can then be trusted, and no prior correction is valid.

    Args:
        bbse, em: the site's estimates ``{"prevalence", "ci_low", "ci_high"}`` (``prevalence`` None when undefined).

    Returns:
        A sentence, or None.
    """
    found = [e for e in (bbse, em) if e.get("prevalence") is not None]
    edge = [e for e in found if not LABEL_SHIFT_EDGE < e["prevalence"] < 1 - LABEL_SHIFT_EDGE]
    if edge:
        return (f"the {edge[0]['method'].upper()} estimate ({edge[0]['prevalence']:.2f}) is at the edge of what it can "
                "give: the images here differ from the source's in more than the prevalence of the finding")
    if len(found) == 2 and None not in (bbse["ci_low"], bbse["ci_high"], em["ci_low"], em["ci_high"]) and (
            bbse["ci_high"] < em["ci_low"] or em["ci_high"] < bbse["ci_low"]):
        return (f"BBSE ({bbse['prevalence']:.2f} [{bbse['ci_low']:.2f}–{bbse['ci_high']:.2f}]) and EM "
                f"({em['prevalence']:.2f} [{em['ci_low']:.2f}–{em['ci_high']:.2f}]) disagree: under a shift in "
                "prevalence alone they estimate the same value, so the images here differ in more than prevalence")
    return None


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


@tracking.stage("deploy")
def run_deploy(config: PipelineConfig, ws: Workspace) -> dict:
    """Name the deployed model, set its operating point on the source validation split, estimate the target's
    prevalence and the model's performance at every evaluated site without their labels, and write it all.

    Args:
        config: the run's config: ``data`` (roles, transforms), ``report.recalibrate`` (calibration),
            ``adapt.label_shift`` (the correction at the target), ``report.n_bootstrap`` / ``confidence``.
        ws: reads the fine-tuned (and adapted) model, the manifest and ``adapt/target_probabilities.safetensors``
            (the adaptation candidates' predictions, for the agreement estimate); writes ``deploy/``.

    Returns:
        The deployed model's card (``origin``, ``threshold``, ``calibration``, ``label_shift``, ...).

    Raises:
        FileNotFoundError: without a fine-tuned model.
        ValueError: when the source hospitals have no validation images of both classes (no threshold).
    """
    data = config.data
    manifest = load_split_manifest(ws, data)
    origin = deployed_origin(config, ws)
    model, model_card = _load(origin, ws)
    source_val = manifest[(manifest["role"] == "source") & (manifest["split"] == "val")]
    y_val = source_val["label"].astype(int).to_numpy()
    if len(np.unique(y_val)) < 2:
        raise ValueError(f"the source hospitals' validation split has {len(y_val)} image(s) of class(es) "
                         f"{sorted(set(y_val.tolist()))}: the operating threshold and the calibration need both "
                         "classes; raise data.val_fraction or label more source images")
    target_unlabeled = manifest[(manifest["role"] == "target") & (manifest["split"] == "unlabeled")]
    evaluated = evaluation_rows(manifest)
    raw = _score(model, config, source_val, target_unlabeled, evaluated)

    calibration = _calibrate(config.report.recalibrate, raw.source_val, y_val)
    source_prob = _apply(calibration, raw.source_val)
    threshold = youden_threshold(y_val, source_prob)
    # the prevalence the deployed probabilities reflect: the source's, when they are calibrated; the training
    # loss's otherwise (class weights move it); their mean on the source validation split measures it either way
    assumed_prior = float(source_prob.mean())
    groups_val = source_val["patient_id"].to_numpy()

    evaluated_prob = _apply(calibration, raw.evaluated)
    target_prob = _apply(calibration, raw.target_unlabeled)
    estimate_on = _sites(evaluated, target_unlabeled, evaluated_prob, target_prob, data.target_hospital)
    per_site_prevalence = {}
    for hospital, (role, _, groups, which) in estimate_on.items():
        site_raw = _raw_of(hospital, raw, evaluated, data.target_hospital)
        estimates = {method: _estimate_prevalence(method, raw.source_val, y_val, groups_val, site_raw, groups, config)
                     for method in ("bbse", "em")}
        per_site_prevalence[hospital] = {"role": role, "images": which, **estimates,
                                         "inconsistent": label_shift_inconsistency(estimates["bbse"], estimates["em"])}
    label_shift = _label_shift_correction(config, per_site_prevalence, assumed_prior, calibrated=calibration is not None)
    if label_shift["applied"]:
        at_target = (evaluated["hospital"] == data.target_hospital).to_numpy()
        evaluated_prob = evaluated_prob.copy()
        evaluated_prob[at_target] = _correct(evaluated_prob[at_target], assumed_prior, label_shift["target_prior"])
        target_prob = _correct(target_prob, assumed_prior, label_shift["target_prior"])
        # the label-free estimates read the probabilities as deployed: corrected at the target
        estimate_on = _sites(evaluated, target_unlabeled, evaluated_prob, target_prob, data.target_hospital)

    pool = _candidate_pool(ws, origin, len(target_prob), calibration, label_shift, assumed_prior)
    estimates = _label_free_estimates(config, source_prob, y_val, threshold, estimate_on, target_prob,
                                      target_unlabeled, pool)
    predictions = pd.DataFrame({"model": MODEL_NAME, "hospital": evaluated["hospital"].to_numpy(),
                                "role": evaluated["role"].to_numpy(), "patient_id": evaluated["patient_id"].to_numpy(),
                                "label": evaluated["label"].astype(int).to_numpy(), "prob": evaluated_prob,
                                "raw_prob": raw.evaluated})
    card = {
        "origin": {"stage": origin.stage, "file": origin.file, "description": origin.description,
                   "notes": origin.notes, **origin.details},
        "backbone": model_card.get("backbone"),
        "threshold": threshold,
        "threshold_source": (f"Youden index of the deployed model{' (recalibrated)' if calibration else ''} on the "
                             f"source validation split ({len(source_val)} images)"),
        "calibration": ({"method": "none"} if calibration is None else
                        {"method": config.report.recalibrate, "temperature": float(calibration.temperature_),
                         "bias": [float(b) for b in calibration.bias_], "fitted_on": "source validation split",
                         "nll_before": float(calibration.nll_before_), "nll_after": float(calibration.nll_after_)}),
        "label_shift": label_shift,
        "inputs": deploy_inputs(config, ws, origin),
        "images_read": {"threshold_and_calibration": images_read(source_val),
                        "target_unlabeled": images_read(target_unlabeled) if len(target_unlabeled) else {},
                        "evaluation": images_read(evaluated)},
        "created_at": datetime.now(timezone.utc).isoformat(), "medtl_version": medtl.__version__,
    }
    card = jsonable(card)
    _save_model(model, ws.deploy / "model", card)
    _write_parquet(predictions, ws.deploy / "predictions.parquet")
    _write_json(ws.deploy / "analysis.json", jsonable({"prevalence": per_site_prevalence,
                                                       "performance_estimates": estimates,
                                                       "note": "no label of a target or external image is read "
                                                               "here"}))
    tracking.log_model(ws.deploy / "model.safetensors", ws.deploy / "model.json", ws.deploy / "analysis.json")
    log.info("deploy: %s; threshold %.3f%s%s", origin.description, threshold,
             f", {config.report.recalibrate} calibration" if calibration else "",
             f", prevalence at {data.target_hospital} corrected to {label_shift['target_prior']:.3f}"
             if label_shift["applied"] else "")
    return {**card, "predictions": str(ws.deploy / "predictions.parquet")}


def _sites(evaluated: pd.DataFrame, target_unlabeled: pd.DataFrame, evaluated_prob: np.ndarray,
           target_prob: np.ndarray, target: str | None) -> dict[str, tuple[str, np.ndarray, np.ndarray, str]]:
    """Per site, the images label-free estimates read: the target's unlabeled images (what a site has before any
    labelling), every other site's evaluated images (their labels unused)."""
    out = {}
    for hospital, rows in evaluated.groupby("hospital", sort=True):
        if hospital == target and len(target_unlabeled):
            continue
        mask = (evaluated["hospital"] == hospital).to_numpy()
        out[str(hospital)] = (str(rows["role"].iloc[0]), evaluated_prob[mask], rows["patient_id"].to_numpy(),
                              "evaluated images (labels unused)")
    if target is not None and len(target_unlabeled):
        out[target] = ("target", target_prob, target_unlabeled["patient_id"].to_numpy(), "unlabeled images")
    return out


def _raw_of(hospital: str, raw: _Scored, evaluated: pd.DataFrame, target: str | None) -> np.ndarray:
    """The network's own probabilities at ``hospital``, the ones prevalence estimation reads (it calibrates them
    itself for EM, on the same source validation split)."""
    if hospital == target and len(raw.target_unlabeled):
        return raw.target_unlabeled
    return raw.evaluated[(evaluated["hospital"] == hospital).to_numpy()]


def _candidate_pool(ws: Workspace, origin: DeployedOrigin, n_target: int, calibration: TemperatureScaling | None,
                    label_shift: dict, assumed_prior: float) -> np.ndarray | str | None:
    """The adaptation candidates' P(finding) on the target's unlabeled images (K, N_t), recalibrated and corrected
    as the deployed model's are; a reason (str) when they cannot be used; None without adaptation."""
    from safetensors.torch import load_file

    pool_file = ws.adapt / "target_probabilities.safetensors"
    if origin.stage != "adapt" or not pool_file.exists():
        return None
    pool = [p.numpy()[:, 1] for p in load_file(str(pool_file)).values()]
    if not pool or any(len(p) != n_target for p in pool):
        return ("the adaptation candidates' saved predictions do not cover the target's current unlabeled images: "
                "re-run medtl adapt")
    pool = [_apply(calibration, p) for p in pool]
    if label_shift["applied"]:
        pool = [_correct(p, assumed_prior, label_shift["target_prior"]) for p in pool]
    return np.stack(pool)


def _label_free_estimates(config: PipelineConfig, source_prob: np.ndarray, y_val: np.ndarray, threshold: float,
                          sites: dict, target_prob: np.ndarray, target_unlabeled: pd.DataFrame,
                          pool: np.ndarray | str | None) -> dict[str, dict]:
    """ATC at every site and, at the target, the agreement of the adaptation candidates: estimated AUC and accuracy
    at the operating threshold without the site's labels (:mod:`medtl.evaluate.label_free`)."""
    n_bootstrap, confidence = config.report.n_bootstrap, config.report.confidence
    atc = ATCEstimator(n_bootstrap=n_bootstrap, confidence=confidence).fit(source_prob, y_val, threshold)
    out: dict[str, dict] = {}
    for hospital, (role, prob, groups, which) in sites.items():
        out[hospital] = {"role": role, "images": which, "atc": atc.estimate(prob, groups=groups)}
    target = config.data.target_hospital
    if target in out and isinstance(pool, np.ndarray):
        out[target]["agreement"] = AgreementEstimator(n_bootstrap=n_bootstrap, confidence=confidence).estimate(
            target_prob, pool, threshold, groups=target_unlabeled["patient_id"].to_numpy())
    elif target in out and isinstance(pool, str):
        out[target]["agreement_unavailable"] = pool
    return out


def load_deployed(ws: Workspace) -> tuple[Backbone, dict]:
    """The deployed model and its card (threshold, calibration, label-shift correction), from the file alone.

    Args:
        ws: a workspace where :func:`run_deploy` ran.

    Returns:
        The model in eval mode and its card.
    """
    path = ws.deploy / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `medtl deploy` (after finetune, and adapt when a target "
                                "hospital is set)")
    return load_model(path)
