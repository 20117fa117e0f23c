"""One function per pipeline stage. The CLI, notebooks and every Prefect task call these.

Each stage reads its inputs from, and writes its outputs to, a :class:`~medtl.workspace.Workspace`,
and returns a small JSON-able summary.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch


import medtl
from medtl import tracking
from medtl.adapt import (EntropyMinimisation, build_adaptation_loss, recompute_batchnorm_statistics,
                         tent_parameters)
from medtl.config import (AdaptConfig, DataConfig, FewshotConfig, FinetuneConfig, IngestConfig, PipelineConfig,
                          PretrainConfig, ReportConfig, SelectConfig, SynthConfig, TrainConfig)
from medtl.data.datasets import PairedLoader, SampleDataset, assign_splits, make_loader, to_records
from medtl.data.transforms import eval_transform, ssl_views_transform, train_transform, weak_strong_transform
from medtl.evaluate.metrics import binary_metrics, youden_threshold
from medtl.finetune import (L2SP, EarlyStopping, GradualUnfreezing, add_lora, apply_batchnorm_policy, lp_ft,
                            merge_lora, negative_transfer, optimizer_groups, trainable_parameter_report)
from medtl.models import Backbone, create_backbone, load_model, save_backbone
from medtl.models.registry import get_backbone_cfg
from medtl.select import SCORES, BackboneSelector, validate_selection
from medtl.select.target_aware import TargetAwareRanker
from medtl.select.unsupervised import UNSUPERVISED_SCORES, UnsupervisedSelector, per_sample_cross_entropy
from medtl.ssl import KnnMonitor, build_ssl_objective
from medtl.train import Objective, Supervised, TaskWithAdaptation, balanced_class_weights, fit
from medtl.train.checkpoint import atomic_save_tensors, load_tensors
from medtl.train.core import run_fingerprint
from medtl.train.inference import embed_with_source_head, features_and_probabilities, positive_probability
from medtl.workspace import Workspace, atomic_write

log = logging.getLogger("medtl")


# ----------------------------------------------------------------------------------------------- data


def load_split_manifest(ws: Workspace, data: DataConfig) -> pd.DataFrame:
    """The ingested manifest with a patient-level ``split`` and each hospital's ``role``: ``source``, ``target``
    (``data.target_hospital``; none in a single-hospital study) or ``external`` (every other hospital)."""
    from medtl.ingest import load_manifest

    if not ws.manifest.exists():
        raise FileNotFoundError(f"{ws.manifest} not found: run `medtl ingest` (or the ingest flow) first")
    manifest = assign_splits(load_manifest(ws), data.val_fraction, data.test_fraction, data.split_seed)
    hospitals = set(manifest["hospital"])
    named = [*data.source_hospitals, *([data.target_hospital] if data.target_hospital is not None else [])]
    missing = [h for h in named if h not in hospitals]
    if missing:
        raise ValueError(f"data: hospital(s) {missing} are not in the manifest, which has {sorted(hospitals)}; "
                         "fix data.source_hospitals / data.target_hospital" + _pseudonym_hint(hospitals))
    manifest["role"] = np.where(manifest["hospital"].isin(data.source_hospitals), "source",
                                np.where(manifest["hospital"] == data.target_hospital, "target", "external"))
    return manifest


def _pseudonym_hint(hospitals: set[str]) -> str:
    """What to do when the manifest names sites by pseudonym: the ingest stage labels every site without an alias."""
    if not any(str(h).startswith("site-") for h in hospitals):
        return ""
    return ("; the manifest names sites without an alias by keyed site-… pseudonyms: map each site's "
            "InstitutionName to your label in ingest.deid.site_aliases and re-run ingest")


def evaluation_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per hospital, the labeled images whose labels training never saw: the test split of source
    hospitals, every labeled image of the others."""
    labeled = manifest[manifest["label"].notna()]
    return labeled[(labeled["role"] != "source") | (labeled["split"] == "test")]


def _dataset(rows: pd.DataFrame, transform) -> SampleDataset:
    if len(rows) == 0:
        raise ValueError("no images selected for this stage: check data.* hospitals and split fractions")
    return SampleDataset(to_records(rows), transform)


def _eval_loader(rows: pd.DataFrame, backbone: Backbone, data: DataConfig, batch_size: int = 64):
    t = eval_transform(data.spatial_dims, data.image_size, backbone.cfg.mean, backbone.cfg.std)
    return make_loader(_dataset(rows, t), batch_size, shuffle=False, num_workers=data.num_workers)


def _train_loader(rows: pd.DataFrame, backbone: Backbone, data: DataConfig, batch_size: int):
    t = train_transform(data.spatial_dims, data.image_size, backbone.cfg.mean, backbone.cfg.std, data.augment)
    return make_loader(_dataset(rows, t), batch_size, shuffle=True, num_workers=data.num_workers, drop_last=True)


def images_read(*frames: pd.DataFrame) -> dict[str, int]:
    """How many distinct images of each hospital a stage read (the union of ``frames``): what each stage records
    for the report's data-use table.

    Args:
        frames: manifest rows, with ``hospital`` and ``content_hash``.

    Returns:
        hospital → number of images, sorted by hospital.
    """
    rows = pd.concat(frames, ignore_index=True).drop_duplicates("content_hash")
    return {str(h): int(n) for h, n in rows.groupby("hospital", sort=True).size().items()}


def pretraining_rows(manifest: pd.DataFrame, data: DataConfig, hospitals: list[str] | None) -> pd.DataFrame:
    """The images self-supervised pretraining may read: of ``hospitals`` (default: the source hospitals and the
    target), every image that is not evaluated (:func:`evaluation_rows`), so no evaluated image and, by default,
    no external hospital's image is ever seen, not even without its label.

    Args:
        manifest: the split manifest (with ``role``).
        data: names the source and target hospitals.
        hospitals: ``pretrain.hospitals``, or None for the default.

    Raises:
        ValueError: naming a listed hospital that is not in the manifest.
    """
    if hospitals is None:
        hospitals = [*data.source_hospitals, *([data.target_hospital] if data.target_hospital is not None else [])]
    unknown = sorted(set(hospitals) - set(manifest["hospital"]))
    if unknown:
        raise ValueError(f"pretrain.hospitals {unknown} are not in the manifest, which has "
                         f"{sorted(set(manifest['hospital']))}; fix pretrain.hospitals (null = source + target)"
                         + _pseudonym_hint(set(manifest["hospital"])))
    pool = manifest.drop(index=evaluation_rows(manifest).index)
    return pool[pool["hospital"].isin(hospitals)]


def data_hash(rows: pd.DataFrame) -> str:
    """Content hash of the images a stage used (order-independent)."""
    return hashlib.sha256("\n".join(sorted(rows["content_hash"])).encode()).hexdigest()


def input_settings(data: DataConfig) -> dict:
    """What the shared transforms make of an image (size, dimensions, augmentation): part of every training
    stage's checkpoint fingerprint, so that changing them retrains instead of resuming the old run."""
    return {"image_size": data.image_size, "spatial_dims": data.spatial_dims,
            "augment": data.augment.model_dump(mode="json")}


def _write_json(path: Path, payload: dict) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))


def _write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


# --------------------------------------------------------------------------------------------- stages


@tracking.stage("synth")
def run_synth(cfg: SynthConfig, ws: Workspace) -> dict:
    """Write the embedded synthetic multi-hospital cohort to ``ws.dicom``."""
    from medtl.synth import write_cohort

    summary = write_cohort(cfg, ws.dicom)
    log.info("synth: %s", summary)
    return {"summary": str(summary), "out_dir": str(ws.dicom)}


@tracking.stage("ingest")
def run_ingest(cfg: IngestConfig, ws: Workspace) -> dict:
    """DICOM folder → de-identified arrays + manifest; prints the accounting line. With ``cfg.pacs`` the
    folder is ``ws.pacs_incoming``, first filled from the PACS (only instances not already there)."""
    from medtl.ingest import ingest_folder

    return _ingest_result(ingest_folder(_pulled_source(cfg, ws), ws), ws)


def _ingest_source(cfg: IngestConfig, ws: Workspace) -> IngestConfig:
    """``cfg`` reading from the PACS inbox when a PACS is configured (what ingestion then ingests)."""
    return cfg.model_copy(update={"input_dir": ws.pacs_incoming}) if cfg.pacs is not None else cfg


def _pulled_source(cfg: IngestConfig, ws: Workspace) -> IngestConfig:
    """:func:`_ingest_source`, after pulling into the PACS inbox what it does not hold yet."""
    if cfg.pacs is not None:
        from medtl.ingest.sources import pull

        log.info("ingest: pulled %s", pull(cfg.pacs, ws.pacs_incoming))
    return _ingest_source(cfg, ws)


def _ingest_result(summary, ws: Workspace) -> dict:
    tracking.log_metrics({k: getattr(summary, k) for k in ("files_in", "ingested", "quarantined", "duplicates")})
    log.info("ingest: %s", summary)
    return {"summary": str(summary), "manifest": str(ws.manifest)}


def run_ingest_plan(cfg: IngestConfig, ws: Workspace, shards: int) -> dict:
    """Sharded ingestion, step 1 of 3: pull from the PACS when one is configured, then plan the run and split the
    files to parse into ``shards`` pieces (:func:`medtl.ingest.shards.plan_shards`; 2D only).

    Args:
        cfg: the ``ingest`` section.
        ws: the run's workspace (every shard must see it, e.g. on a shared file system).
        shards: how many pieces.

    Returns:
        ``{"shards": [files per shard], "files_in", "to_parse", "plan"}``.
    """
    from medtl.ingest.shards import plan_shards

    return plan_shards(_pulled_source(cfg, ws), ws, shards)


def run_ingest_shard(cfg: IngestConfig, ws: Workspace, shard: int) -> dict:
    """Sharded ingestion, step 2 of 3: the per-file work of one shard (:func:`medtl.ingest.shards.ingest_shard`).

    Args:
        cfg: the ``ingest`` section the plan was made with.
        ws: the run's workspace.
        shard: the shard's index.

    Returns:
        ``{"shard", "files", "quarantined", "results"}``.
    """
    from medtl.ingest.shards import ingest_shard

    return ingest_shard(_ingest_source(cfg, ws), ws, shard)


@tracking.stage("ingest")
def run_ingest_merge(cfg: IngestConfig, ws: Workspace) -> dict:
    """Sharded ingestion, step 3 of 3: settle every shard into the manifest and ledger
    (:func:`medtl.ingest.shards.merge_shards`); returns what :func:`run_ingest` returns.

    Args:
        cfg: the ``ingest`` section the plan was made with.
        ws: the run's workspace.

    Returns:
        ``{"summary", "manifest"}``.
    """
    from medtl.ingest.shards import merge_shards

    return _ingest_result(merge_shards(_ingest_source(cfg, ws), ws), ws)


@tracking.stage("pretrain")
def run_pretrain(cfg: PretrainConfig, data: DataConfig, ws: Workspace) -> dict:
    """Self-supervised pretraining (labels unused) on :func:`pretraining_rows`; exports ``<arch>.ssl``."""
    manifest = load_split_manifest(ws, data)
    rows = pretraining_rows(manifest, data, cfg.hospitals)
    init = cfg.init or f"{cfg.arch}.scratch"
    if init.split(".")[0] != cfg.arch:
        raise ValueError(f"pretrain.init {init!r} is not a {cfg.arch!r} backbone; make pretrain.arch match it")
    backbone = create_backbone(init, num_classes=0, weights_dir=ws.weights)
    transform = ssl_views_transform(data.spatial_dims, data.image_size, backbone.cfg.mean, backbone.cfg.std,
                                    data.augment)
    loader = make_loader(_dataset(rows, transform), cfg.train.batch_size, shuffle=True,
                         num_workers=data.num_workers, drop_last=True)
    objective = build_ssl_objective(cfg.method, backbone, projection_dim=cfg.projection_dim,
                                    temperature=cfg.temperature, total_steps=cfg.train.epochs * len(loader))
    digest = data_hash(rows)
    monitor = _knn_monitor(rows, backbone, data, cfg)
    result = fit(backbone, objective, loader, cfg.train, checkpoint_dir=ws.pretrain / "checkpoints",
                 fingerprint_extra={"init": init, "data": digest, "input": input_settings(data),
                                    # everything that shapes the objective; the k-NN monitor only watches
                                    "objective": cfg.model_dump(mode="json", exclude={"train", "knn_every", "knn_k"})},
                 callbacks=[*([monitor] if monitor else []), *tracking.epoch_callbacks()],
                 description=f"pretrain {cfg.method}")
    knn_curve = [{"epoch": h["epoch"], "knn_acc": h["knn_acc"]} for h in result.history if "knn_acc" in h]
    card = {
        "method": cfg.method, "init": init, "epochs": cfg.train.epochs,
        "n_images": len(rows), "hospitals": sorted(rows["hospital"].unique()), "data_sha256": digest,
        "images_read": images_read(rows),
        "seed": cfg.train.seed, "config": cfg.model_dump(mode="json"), "views": input_settings(data),
        "knn_curve": knn_curve,
        "history": result.history,
        "created_at": datetime.now(timezone.utc).isoformat(), "medtl_version": medtl.__version__,
    }
    path = save_backbone(backbone, ws.weights / f"{cfg.arch}.ssl", card)
    tracking.log_model(path, path.with_suffix(".json"))
    _write_json(ws.pretrain / "card.json", card)
    return {"weights": str(path), "final_loss": result.history[-1].get("loss"), "seconds": result.seconds,
            "knn_curve": knn_curve}


def _knn_monitor(rows: pd.DataFrame, backbone: Backbone, data: DataConfig, cfg: PretrainConfig) -> KnnMonitor | None:
    """k-NN accuracy of the embeddings on the pool's labeled validation images, neighbours from its labeled
    training images (labels are only looked at, never trained on); None when either side lacks two classes."""
    labeled = rows[rows["label"].notna()]
    train, val = labeled[labeled["split"] == "train"], labeled[labeled["split"] == "val"]
    if train["label"].nunique() < 2 or val["label"].nunique() < 2:
        log.info("pretrain: no k-NN monitor (the pool needs labeled train and val images of two classes)")
        return None
    return KnnMonitor(_eval_loader(train, backbone, data), _eval_loader(val, backbone, data), every=cfg.knn_every,
                      epochs=cfg.train.epochs, k=cfg.knn_k)


@tracking.stage("select")
def run_select(cfg: SelectConfig, data: DataConfig, ws: Workspace) -> dict:
    """Score every candidate backbone on the source hospitals' labeled train+val images and rank them.

    With ``cfg.validation`` set (validation mode), every scored candidate is also fine-tuned with those settings
    on the source training split, and :func:`medtl.select.validate_selection` compares each score's ranking with
    the fine-tuned validation AUCs; the comparison goes to ``select/validation.json`` and the returned
    ``validation`` entry.
    """
    manifest = load_split_manifest(ws, data)
    rows = manifest[(manifest["role"] == "source") & manifest["split"].isin(["train", "val"])]
    y = rows["label"].astype(int).to_numpy()
    target_rows = manifest[(manifest["role"] == "target") & (manifest["split"] == "unlabeled")]
    # by default whenever there is a target to look at: a target without unlabeled images cannot be adapted to either
    target_aware = cfg.target_aware if cfg.target_aware is not None else len(target_rows) > 0
    if target_aware and len(target_rows) == 0:
        raise ValueError(f"select.target_aware needs unlabeled images of the target hospital "
                         f"{data.target_hospital!r}, and the manifest has none; set select.target_aware: false")
    features, target_features, source_probabilities, skipped, feature_seconds = {}, {}, {}, {}, {}
    for name in cfg.candidates:
        try:
            source_classes = get_backbone_cfg(name, ws.weights).pretrained_classes
            # a scratch candidate's random weights, and so its scores, are the same on every run; the caller's
            # random state is left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                backbone = create_backbone(name, num_classes=source_classes, weights_dir=ws.weights)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("select: skipping %s: %s", name, exc)
            skipped[name] = str(exc)
            continue
        start = time.perf_counter()
        features[name], probabilities = embed_with_source_head(backbone, _eval_loader(rows, backbone, data))
        feature_seconds[name] = time.perf_counter() - start
        if probabilities is not None:
            source_probabilities[name] = probabilities
        if target_aware:
            target_features[name] = embed_with_source_head(backbone, _eval_loader(target_rows, backbone, data))[0]
    groups = rows["patient_id"].to_numpy()
    selector = BackboneSelector(rank_by=cfg.rank_by, cv_folds=cfg.cv_folds).fit(
        features, y, groups, source_probabilities=source_probabilities)
    ranking = {name: {"backbone": name, **{score: _finite_or_none(row[score]) for score in SCORES},
                      "rank": int(row["rank"])} for name, row in selector.scores_.iterrows()}
    best, target_block = selector.best_, None
    if target_aware:
        ranker = TargetAwareRanker(cv_folds=cfg.cv_folds).fit(selector.scores_[cfg.rank_by], features, y,
                                                              target_features, groups)
        for name, row in ranker.scores_.iterrows():  # the combined order: rank = its position
            target = ranker.target_scores_.loc[name]
            ranking[name].update(source_rank=int(selector.scores_.loc[name, "rank"]),
                                 target_ensv=_finite_or_none(target[ranker.scorer]),
                                 target_divergence=_finite_or_none(target["divergence"]),
                                 target_rank=_finite_or_none(row["target_rank"]), rank=int(row["rank"]))
        ranking = {name: ranking[name] for name in ranker.ranking_}
        best = ranker.best_
        target_block = {"target_hospital": data.target_hospital, "target_images": len(target_rows),
                        "scorer": ranker.scorer, "source_weight": ranker.source_weight,
                        "source_only_best": selector.best_, "not_scored": ranker.nan_reasons_,
                        "divergence_used": ranker.divergence_used_,
                        "rule": f"rank = mean of the source rank (by {cfg.rank_by}) and the target rank (the rank by "
                                "EnsV of the candidates' source-trained linear probes on the target's unlabeled images"
                                + (", averaged with the rank by the proxy A-distance between source and target "
                                   "features, lower = better)" if ranker.divergence_used_ else
                                   "; the proxy A-distance between source and target features is about the same for "
                                   "every candidate here, so it does not rank)")}
    ranking = [{**row, "chosen": name == best} for name, row in ranking.items()]
    seconds = {name: {score: _finite_or_none(row[score]) for score in SCORES}
               for name, row in selector.seconds_.iterrows()}
    payload = {"rank_by": cfg.rank_by, "best": best, "ranking": ranking, "score_seconds": seconds,
               "feature_seconds": feature_seconds, "not_scored": selector.nan_reasons_, "skipped": skipped,
               "n_images": len(rows), "n_positive": int(y.sum()), "target_aware": target_block,
               "images_read": images_read(rows, *([target_rows] if target_aware else []))}
    if cfg.validation is not None:
        payload["validation"] = _validate_selection(cfg, selector, feature_seconds, data, manifest, ws)
        _write_json(ws.select / "validation.json", payload["validation"])
    _write_json(ws.select / "ranking.json", payload)
    tracking.log_metrics({f"{r['backbone']}.{score}": r[score] for r in ranking for score in SCORES})
    tracking.log_artifacts([ws.select / "ranking.json"], "select")
    log.info("select: %s", ", ".join(f"{r['backbone']} ({cfg.rank_by}={r[cfg.rank_by]:.3f})" for r in ranking))
    return payload


def _validate_selection(cfg: SelectConfig, selector: BackboneSelector, feature_seconds: dict[str, float],
                        data: DataConfig, manifest: pd.DataFrame, ws: Workspace) -> dict:
    """Validation mode: fine-tune every scored candidate with ``cfg.validation`` and compare the scores' rankings
    with the fine-tuned validation AUCs (:func:`medtl.select.validate_selection`).

    Returns:
        ``finetuned``: per candidate its validation AUC (``None`` when it has none, with ``reason``), seconds and
        strategy; ``scores``: one row per score (``weighted_tau``, ``kendall_tau``, ``top_pick``, ``regret``,
        ``top_pick_within_tolerance``, ``score_seconds``, ``finetune_seconds``, ``speedup``, ...), where
        score_seconds leaves out ``feature_seconds``, the one forward pass over the images that every score of
        a candidate shares.
    """
    source = manifest[manifest["role"] == "source"]
    train_rows, val_rows = source[source["split"] == "train"], source[source["split"] == "val"]
    finetuned, auc, seconds = {}, {}, {}
    for name in selector.scores_.index:
        trained = _finetune_one(name, cfg.validation.model_copy(update={"backbone": name}), data, train_rows,
                                val_rows, ws, role=f"select/{name}", checkpoints=ws.select / "validation" / name)
        finetuned[name] = {"val_auc": _finite_or_none(trained.val_auc), "seconds": trained.seconds,
                           "strategy": cfg.validation.strategy}
        if np.isfinite(trained.val_auc):
            auc[name], seconds[name] = trained.val_auc, trained.seconds
        else:
            finetuned[name]["reason"] = "no validation AUC (the source validation split needs both classes)"
    if len(auc) < 2:
        return {"finetuned": finetuned, "scores": [], "tolerance": cfg.tolerance, "feature_seconds": feature_seconds,
                "note": f"{len(auc)} candidate(s) have a fine-tuned validation AUC; ranking needs two or more"}
    from medtl.evaluate.report import jsonable

    table = validate_selection(selector.scores_, selector.seconds_, auc, seconds, tolerance=cfg.tolerance)
    scores = jsonable(table.reset_index().to_dict(orient="records"))  # one row per score, "score" first
    for row in scores:
        log.info("select validation: %s tau_w=%s picks %s (regret %s)", row["score"], row["weighted_tau"],
                 row["top_pick"], row["regret"])
    return {"finetuned": finetuned, "scores": scores, "tolerance": cfg.tolerance, "feature_seconds": feature_seconds,
            "metric": "validation AUC after fine-tuning on the source training split"}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # JSON has no NaN


def _chosen_backbone(cfg: FinetuneConfig | FewshotConfig, ws: Workspace) -> str:
    if cfg.backbone:
        return cfg.backbone
    ranking = ws.select / "ranking.json"
    if not ranking.exists():
        raise FileNotFoundError(f"{ranking} not found: run `medtl select` first or set finetune.backbone")
    return json.loads(ranking.read_text())["best"]


def _predict_all(model: Backbone, rows: pd.DataFrame, data: DataConfig, name: str) -> pd.DataFrame:
    prob = positive_probability(model, _eval_loader(rows, model, data))
    return pd.DataFrame({"model": name, "hospital": rows["hospital"].to_numpy(), "role": rows["role"].to_numpy(),
                         "patient_id": rows["patient_id"].to_numpy(), "label": rows["label"].astype(int).to_numpy(),
                         "prob": prob})


@tracking.stage("finetune")
def run_finetune(cfg: FinetuneConfig, data: DataConfig, ws: Workspace) -> dict:
    """Fine-tune the chosen backbone on the source hospitals with ``cfg.strategy``; save model, card and predictions.

    Every strategy trains through the one loop :func:`medtl.train.fit`, with freezing and layer-wise learning
    rates from :func:`medtl.finetune.optimizer_groups`. With ``cfg.scratch_baseline`` the negative-transfer gate
    also trains ``<arch>.scratch`` (strategy ``full``, the same ``cfg.train`` budget and early stopping) and
    compares validation AUCs with :func:`medtl.finetune.negative_transfer`; with ``cfg.on_negative_transfer ==
    "fallback"`` a better scratch model becomes the stage's model, and the card says so.

    Args:
        cfg: the ``finetune`` section.
        data: the hospitals' roles, the splits and the transforms.
        ws: reads the manifest (and ``select/ranking.json`` when ``cfg.backbone`` is unset); writes
            ``finetune/model.safetensors`` (LoRA merged: a plain backbone for :func:`load_finetuned`), its card
            ``finetune/model.json``, ``finetune/predictions.parquet`` and, when the gate trained one,
            ``finetune/scratch_baseline.json`` (the scratch model's history).

    Returns:
        The card without its per-epoch history: ``backbone`` (what :func:`load_finetuned` rebuilds; the scratch
        one after a fallback), ``selected_backbone``, ``saved_model``, ``strategy`` and ``strategy_settings``,
        ``trainable_params`` / ``total_params`` (parameters the strategy trained; LoRA: adapters counted, before
        merging), ``best_val_auc`` / ``best_epoch`` of the transferred run, ``val_auc`` of the saved weights,
        ``early_stopping`` (``None`` when off, else its ``stopped_epoch``), ``class_weights`` of the loss (``None``
        = unweighted), ``negative_transfer``, ``threshold``.
    """
    manifest = load_split_manifest(ws, data)
    name = _chosen_backbone(cfg, ws)
    source = manifest[manifest["role"] == "source"]
    train_rows, val_rows = source[source["split"] == "train"], source[source["split"] == "val"]
    transfer = _finetune_one(name, cfg, data, train_rows, val_rows, ws, role="transfer")
    gate, scratch = _negative_transfer_gate(cfg, data, transfer, train_rows, val_rows, ws)
    kept = scratch if gate["fallback_applied"] and scratch is not None else transfer
    y_val = val_rows["label"].astype(int).to_numpy()
    best_auc, best_epoch = _best_epoch(transfer.history)
    card = {"backbone": kept.name, "selected_backbone": name, "arch": kept.model.cfg.arch,
            "num_classes": cfg.num_classes,
            "saved_model": (f"{kept.name} trained from scratch (strategy full): negative-transfer fallback"
                            if kept is not transfer else f"{name} fine-tuned with strategy {cfg.strategy}"),
            "strategy": cfg.strategy, "strategy_settings": transfer.settings, "batchnorm": cfg.batchnorm,
            "class_weights": transfer.class_weights,
            "n_groups": transfer.n_groups, "frozen_groups": transfer.frozen_groups,
            "trainable_params": transfer.params["trainable"], "total_params": transfer.params["total"],
            "trainable_percent": transfer.params["percent"],
            "epochs": cfg.train.epochs, "epochs_trained": len(transfer.history),
            "best_val_auc": best_auc, "best_epoch": best_epoch, "val_auc": _finite_or_none(kept.val_auc),
            "early_stopping": transfer.early_stopping, "negative_transfer": gate,
            "train_images": len(train_rows), "val_images": len(val_rows),
            "images_read": images_read(train_rows, val_rows),
            "threshold": youden_threshold(y_val, kept.val_prob),
            "threshold_source": f"Youden index of the saved model on the source validation split ({len(val_rows)} "
                                "images)",
            "history": transfer.history, "seconds": transfer.seconds}
    _save_model(kept.model, ws.finetune / "model", card)
    card = json.loads((ws.finetune / "model.json").read_text())  # as saved: with the network's header and hash
    tracking.log_model(ws.finetune / "model.safetensors", ws.finetune / "model.json")
    _write_parquet(_predict_all(kept.model, evaluation_rows(manifest), data, "finetuned"),
                   ws.finetune / "predictions.parquet")
    log.info("finetune: %s with %s, %d/%d parameters trained, val AUC %.3f (best %s at epoch %s); saved %s", name,
             cfg.strategy, transfer.params["trainable"], transfer.params["total"], transfer.val_auc, best_auc,
             best_epoch, card["saved_model"])
    return {k: v for k, v in card.items() if k != "history"}


def run_leave_one_hospital_out(cfg: FinetuneConfig, data: DataConfig, ws: Workspace,
                               n_bootstrap: int = 1000, confidence: float = 0.95) -> dict:
    """Leave-one-hospital-out evaluation of multi-source training, the domain-generalisation baseline.

    For each hospital with labeled images, the chosen backbone is fine-tuned with ``cfg`` (strategy, budget,
    early stopping) on the labeled ``train`` split of *every other* hospital, validated on their ``val`` split,
    and tested on all labeled images of the held-out hospital, which training never saw. ``data``'s source and
    target roles are not used: every hospital takes each role in turn.

    Args:
        cfg: the ``finetune`` section.
        data: the splits and the transforms.
        ws: reads the manifest (and ``select/ranking.json`` when ``cfg.backbone`` is unset); writes
            ``loho/predictions.parquet`` (column ``model`` = ``loho:<held-out hospital>``) and
            ``loho/summary.json``.
        n_bootstrap: patient-level bootstrap resamples of the CIs.
        confidence: level of the CIs (``report.confidence``), recorded in the summary for the report.

    Returns:
        ``{"backbone", "strategy", "confidence", "held_out": {hospital: {"train_hospitals", "train_images",
        "val_images", "test_images", "val_auc", "auc", "auc_ci", "seconds"}}}`` as in ``summary.json``.

    Raises:
        ValueError: with fewer than two hospitals with labeled images.
    """
    manifest = load_split_manifest(ws, data)
    labeled = manifest[manifest["label"].notna()]
    hospitals = sorted(labeled["hospital"].unique())
    if len(hospitals) < 2:
        raise ValueError(f"leave-one-hospital-out needs labeled images from at least two hospitals, the manifest "
                         f"has {hospitals}; label another hospital's images (ingest.labels_csv)")
    name = _chosen_backbone(cfg, ws)
    held_out, predictions = {}, []
    for index, hospital in enumerate(hospitals):
        others = labeled[labeled["hospital"] != hospital]
        test = labeled[labeled["hospital"] == hospital]
        trained = _finetune_one(name, cfg, data, others[others["split"] == "train"], others[others["split"] == "val"],
                                ws, role=f"loho-{index}")
        prob = positive_probability(trained.model, _eval_loader(test, trained.model, data))
        y = test["label"].astype(int).to_numpy()
        metrics = binary_metrics(y, prob, groups=test["patient_id"].to_numpy(), n_bootstrap=n_bootstrap,
                                 confidence=confidence)
        held_out[hospital] = {
            "train_hospitals": sorted(set(others["hospital"])), "train_images": int((others["split"] == "train").sum()),
            "val_images": int((others["split"] == "val").sum()), "test_images": len(test),
            "val_auc": _finite_or_none(trained.val_auc), "auc": _finite_or_none(metrics["auc"]["value"]),
            "auc_ci": [_finite_or_none(metrics["auc"]["ci_low"]), _finite_or_none(metrics["auc"]["ci_high"])],
            "seconds": trained.seconds}
        predictions.append(pd.DataFrame({"model": f"loho:{hospital}", "hospital": hospital, "role": "held_out",
                                         "patient_id": test["patient_id"].to_numpy(), "label": y, "prob": prob}))
        log.info("leave-one-hospital-out: %s held out, trained on %d images of %s: AUC %.3f", hospital,
                 held_out[hospital]["train_images"], ", ".join(held_out[hospital]["train_hospitals"]),
                 metrics["auc"]["value"])
    _write_parquet(pd.concat(predictions, ignore_index=True), ws.loho / "predictions.parquet")
    trained_on = labeled[labeled["split"].isin(["train", "val"])]
    summary = {"backbone": name, "strategy": cfg.strategy, "confidence": confidence, "held_out": held_out,
               # every hospital's training images, each read by the models that left another hospital out
               "images_read": images_read(trained_on)}
    _write_json(ws.loho / "summary.json", summary)
    return summary


def run_fewshot(cfg: FewshotConfig, data: DataConfig, ws: Workspace) -> dict:
    """N-way K-shot prototypical classification (Snell et al. 2017) on a backbone's embeddings, per hospital.

    The backbone is ``cfg.backbone`` or the selector's choice. With ``cfg.train`` it is first trained
    episodically (:class:`medtl.fewshot.PrototypicalLoss`, K = the largest of ``cfg.k_shots``) on the source
    hospitals' training split and saved as ``<arch>.protonet``. Evaluation uses only images that training never
    saw, each hospital on its own: the source hospitals' test split and the labeled images of every other
    hospital (the target, external ones).
    For every hospital and K, :func:`medtl.fewshot.evaluate_episodes` draws ``cfg.episodes`` episodes from that
    hospital's images alone; a hospital with fewer than K + ``n_query`` images of ``n_way`` classes is listed
    with the reason instead.

    Args:
        cfg: the ``fewshot`` section.
        data: which hospitals are source and target; the transforms.
        ws: reads the manifest (and ``select/ranking.json`` when ``cfg.backbone`` is unset); writes
            ``fewshot/summary.json`` and, with ``cfg.train``, ``weights/<arch>.protonet.safetensors``.

    Returns:
        ``{"backbone", "n_way", "n_query", "metric", "episodic_training", "results"}``; each result has
        ``hospital``, ``role``, ``k_shot``, ``images``, ``class_counts`` and either ``accuracy``, ``ci_low``,
        ``ci_high``, ``episodes`` or ``skipped`` (the reason).
    """
    from torch.utils.data import DataLoader

    from medtl.fewshot import EpisodeSampler, PrototypicalLoss, evaluate_episodes
    from medtl.train.inference import embeddings

    manifest = load_split_manifest(ws, data)
    labeled = manifest[manifest["label"].notna()]
    name = _chosen_backbone(cfg, ws)
    backbone = create_backbone(name, num_classes=0, weights_dir=ws.weights)
    training = None
    if cfg.train is not None:
        train_rows = labeled[(labeled["role"] == "source") & (labeled["split"] == "train")]
        k_train = max(cfg.k_shots)
        episode = cfg.n_way * (k_train + cfg.n_query)
        try:
            sampler = EpisodeSampler(train_rows["label"].astype(int).to_numpy(), cfg.n_way, k_train, cfg.n_query,
                                     episodes_per_epoch=max(1, len(train_rows) // episode), seed=cfg.train.seed)
        except ValueError as exc:
            raise ValueError(f"fewshot.train: episodic training on the source hospitals' training split "
                             f"({len(train_rows)} images) with K = {k_train}, the largest of fewshot.k_shots: {exc}. "
                             f"Lower the largest K or n_query, or set fewshot.train: null") from exc
        t = train_transform(data.spatial_dims, data.image_size, backbone.cfg.mean, backbone.cfg.std, data.augment)
        loader = DataLoader(_dataset(train_rows, t), batch_sampler=sampler, num_workers=data.num_workers)
        episodes = {"k_shot": k_train, "n_way": cfg.n_way, "n_query": cfg.n_query, "metric": cfg.metric}
        digest = data_hash(train_rows)
        result = fit(backbone, PrototypicalLoss(cfg.n_way, k_train, cfg.n_query, metric=cfg.metric), loader,
                     cfg.train, checkpoint_dir=ws.fewshot / "checkpoints",
                     fingerprint_extra={"backbone": name, **episodes, "data": digest, "input": input_settings(data)},
                     callbacks=tracking.epoch_callbacks("fewshot/"), description="fewshot episodic training")
        card = {"method": "prototypical episodic training", "init": name, **episodes, "data_sha256": digest,
                "history": result.history, "created_at": datetime.now(timezone.utc).isoformat(),
                "medtl_version": medtl.__version__}
        saved = save_backbone(backbone, ws.weights / f"{backbone.cfg.arch}.protonet", card)
        training = {"k_shot": k_train, "episodes_per_epoch": len(sampler), "epochs": len(result.history),
                    "history": result.history, "seconds": result.seconds, "weights": str(saved)}
    # every labeled image but the source hospitals' training and validation splits: nothing training saw
    unseen = labeled[(labeled["role"] != "source") | (labeled["split"] == "test")]
    results = []
    for (hospital, role), rows in unseen.groupby(["hospital", "role"], sort=True):
        labels = rows["label"].astype(int).to_numpy()
        counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}  # JSON keys
        features = embeddings(backbone, _eval_loader(rows, backbone, data))
        for k in cfg.k_shots:
            row = {"hospital": hospital, "role": role, "k_shot": k, "images": len(rows), "class_counts": counts}
            enough = sum(n >= k + cfg.n_query for n in counts.values())
            if enough < cfg.n_way:
                row["skipped"] = (f"{enough} class(es) have the {k + cfg.n_query} images (K={k} + n_query="
                                  f"{cfg.n_query}) a {cfg.n_way}-way episode needs; lower n_query or K")
            else:
                row.update(evaluate_episodes(features, labels, cfg.n_way, k, cfg.n_query, episodes=cfg.episodes,
                                             seed=cfg.train.seed if cfg.train else 0, metric=cfg.metric))
            results.append(row)
            log.info("fewshot: %s K=%d %s", hospital, k, row.get("skipped") or f"accuracy {row['accuracy']:.3f}")
    summary = {"backbone": name, "n_way": cfg.n_way, "n_query": cfg.n_query, "metric": cfg.metric,
               "episodic_training": training, "evaluated_on": "the source hospitals' test split and every other "
               "hospital's labeled images, each hospital on its own", "results": results}
    _write_json(ws.fewshot / "summary.json", summary)
    return summary


@dataclass
class _Recipe:
    """What one fine-tuning strategy puts into the call to :func:`fit`.

    Attributes:
        objective: the loss: :class:`Supervised`, or :class:`~medtl.finetune.L2SP` around it.
        train: the training settings (``l2sp`` turns weight decay off).
        param_groups: optimizer groups from :func:`optimizer_groups`; ``None`` for ``lp_ft``, whose
            :func:`~medtl.finetune.lp_ft` builds them for each phase with the same function.
        callbacks: what the strategy runs after each epoch (gradual unfreezing), before validation.
        settings: the strategy's settings, as the card records them.
    """

    objective: Objective
    train: TrainConfig
    param_groups: list[dict] | None
    callbacks: list
    settings: dict


def _recipe_layer_groups(model: Backbone, cfg: FinetuneConfig, task: Supervised) -> _Recipe:
    """``full`` / ``freeze`` / ``linear_probe``: the first none / ``freeze_groups`` / all-but-the-classifier
    groups frozen, the rest at layer-wise decayed rates."""
    freeze = {"full": 0, "freeze": cfg.freeze_groups, "linear_probe": "all"}[cfg.strategy]
    groups, _ = optimizer_groups(model, cfg.train.lr, freeze=freeze, layer_decay=cfg.layer_decay)
    return _Recipe(task, cfg.train, groups, [], {"freeze_groups": freeze, "layer_decay": cfg.layer_decay})


def _recipe_gradual(model: Backbone, cfg: FinetuneConfig, task: Supervised) -> _Recipe:
    """``gradual_unfreeze``: the classifier first, one more group every ``unfreeze_every`` epochs."""
    # Every group goes into the optimizer now (frozen ones get no gradient), so unfreezing needs no new optimizer
    # and a checkpoint resumes with the same optimizer layout.
    groups, _ = optimizer_groups(model, cfg.train.lr, freeze="all", layer_decay=cfg.layer_decay, include_frozen=True)
    return _Recipe(task, cfg.train, groups, [GradualUnfreezing(cfg.unfreeze_every)],
                   {"unfreeze_every": cfg.unfreeze_every, "layer_decay": cfg.layer_decay})


def _recipe_lp_ft(model: Backbone, cfg: FinetuneConfig, task: Supervised) -> _Recipe:
    """``lp_ft``: a linear probe for ``lp_epochs``, then every group for the rest of ``train.epochs``."""
    return _Recipe(task, cfg.train, None, [],
                   {"lp_epochs": cfg.lp_epochs, "finetune_epochs": cfg.train.epochs - cfg.lp_epochs,
                    "layer_decay": cfg.layer_decay})


def _recipe_l2sp(model: Backbone, cfg: FinetuneConfig, task: Supervised) -> _Recipe:
    """``l2sp``: every group trains, pulled towards the pretrained weights (read from ``model`` now)."""
    groups, _ = optimizer_groups(model, cfg.train.lr, freeze=0, layer_decay=cfg.layer_decay)
    # L2-SP's pull towards w0 replaces weight decay's pull towards 0 (Li et al. 2018): decay off.
    return _Recipe(L2SP(task, model, alpha=cfg.l2sp_alpha, beta=cfg.l2sp_beta),
                   cfg.train.model_copy(update={"weight_decay": 0.0}), groups, [],
                   {"l2sp_alpha": cfg.l2sp_alpha, "l2sp_beta": cfg.l2sp_beta, "weight_decay": 0.0,
                    "layer_decay": cfg.layer_decay})


def _recipe_lora(model: Backbone, cfg: FinetuneConfig, task: Supervised) -> _Recipe:
    """``lora``: low-rank adapters on every dense convolution / linear layer, plus the whole classifier."""
    wrapped = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    # add_lora froze the rest; optimizer_groups keeps the trainable parameters (adapters, classifier), each in
    # its layer group at its decayed rate.
    groups, _ = optimizer_groups(model, cfg.train.lr, freeze=0, layer_decay=cfg.layer_decay)
    return _Recipe(task, cfg.train, groups, [],
                   {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "adapted_layers": len(wrapped),
                    "layer_decay": cfg.layer_decay})


_RECIPES = {"full": _recipe_layer_groups, "freeze": _recipe_layer_groups, "linear_probe": _recipe_layer_groups,
            "gradual_unfreeze": _recipe_gradual, "lp_ft": _recipe_lp_ft, "l2sp": _recipe_l2sp, "lora": _recipe_lora}


class _KeepBatchNormFrozen:
    """``fit`` callback for ``batchnorm: frozen | adabn``.

    Unfreezing layer groups (gradual unfreezing; LP-FT's second phase) gives their BatchNorm layers trainable
    statistics back; this freezes them again before the first epoch and after every epoch, so the statistics
    stay what the policy set. List it after the callbacks that unfreeze.
    """

    def on_fit_start(self, model: torch.nn.Module, history: list[dict]) -> None:
        apply_batchnorm_policy(model, "frozen")

    def __call__(self, epoch: int, model: torch.nn.Module, logs: dict) -> None:
        apply_batchnorm_policy(model, "frozen")


def _apply_batchnorm(model: Backbone, policy: str, train_rows: pd.DataFrame, data: DataConfig) -> None:
    """``finetune.batchnorm`` on a fresh model, before a strategy freezes or wraps anything.

    Args:
        model: modified in place.
        policy: ``train`` (nothing to do), ``frozen``, or ``adabn``: statistics re-estimated on the source
            training images (un-augmented), replacing the pretraining data's, then frozen.
        train_rows: the source training split.
        data: transforms.
    """
    if policy == "adabn":
        with torch.no_grad():  # statistics only: no graph to keep
            apply_batchnorm_policy(model, "adabn", (b["image"] for b in _eval_loader(train_rows, model, data)))
    elif policy == "frozen":
        apply_batchnorm_policy(model, "frozen")


def _validation_scores(model: torch.nn.Module, loader, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Positive-class probabilities of ``model`` on the validation ``loader`` and their AUC (NaN with one class)."""
    prob = positive_probability(model, loader)
    return prob, float(binary_metrics(y, prob, n_bootstrap=0)["auc"]["value"])


def _best_epoch(history: list[dict]) -> tuple[float | None, int | None]:
    """Highest finite ``val_auc`` of ``history`` and its (earliest) epoch; ``(None, None)`` when none is finite."""
    scored = [(float(h["val_auc"]), int(h["epoch"])) for h in history
              if h.get("val_auc") is not None and np.isfinite(h["val_auc"])]
    if not scored:
        return None, None
    return max(scored, key=lambda pair: pair[0])  # max keeps the first of equal values: the earliest epoch


@dataclass
class _Trained:
    """One model the fine-tune stage trained, and what its card records."""

    name: str
    model: Backbone
    history: list[dict]
    seconds: float
    val_prob: np.ndarray
    val_auc: float
    settings: dict
    n_groups: int
    frozen_groups: int
    params: dict
    early_stopping: dict | None
    class_weights: list[float] | None


def _finetune_one(name: str, cfg: FinetuneConfig, data: DataConfig, train_rows: pd.DataFrame,
                  val_rows: pd.DataFrame, ws: Workspace, role: str, checkpoints: Path | None = None) -> _Trained:
    """Train backbone ``name`` with ``cfg.strategy`` through :func:`fit` and score it on validation.

    Args:
        name: ``arch.tag`` to start from.
        cfg: strategy, its settings, early stopping and the training budget.
        data: transforms.
        train_rows, val_rows: the source training and validation splits.
        ws: weights folder; checkpoints go to ``finetune/checkpoints/<role>``.
        role: ``transfer``, ``scratch`` or ``select/<name>`` (progress and tracking label).
        checkpoints: the run's checkpoint folder; default ``finetune/checkpoints/<role>``.

    Returns:
        The trained model (early stopping's best epoch restored; LoRA merged into a plain backbone), its
        history (LP-FT: both phases, epochs numbered on, each entry with its ``phase``), validation scores and
        parameter counts (LoRA: counted with the adapters, before merging).
    """
    model = create_backbone(name, num_classes=cfg.num_classes, weights_dir=ws.weights)
    _apply_batchnorm(model, cfg.batchnorm, train_rows, data)
    class_weights = _class_weights(cfg, train_rows)
    recipe = _RECIPES[cfg.strategy](model, cfg, Supervised(class_weights=class_weights))
    val_loader = _eval_loader(val_rows, model, data)
    y_val = val_rows["label"].astype(int).to_numpy()

    def validate(epoch: int, m: torch.nn.Module, logs: dict) -> None:
        logs["val_auc"] = _validation_scores(m, val_loader, y_val)[1]

    early = (EarlyStopping("val_auc", mode="max", patience=cfg.early_stopping_patience)
             if cfg.early_stopping_patience is not None else None)
    # Order matters: unfreezing first, then BatchNorm re-freezing, then validation, then early stopping reading it,
    # then the tracker logging the epoch's values.
    callbacks = [*recipe.callbacks, *([_KeepBatchNormFrozen()] if cfg.batchnorm != "train" else []), validate,
                 *([early] if early is not None else []),
                 *tracking.epoch_callbacks("" if role == "transfer" else f"{role}/")]
    loader = _train_loader(train_rows, model, data, cfg.train.batch_size)
    extra = {"backbone": name, "strategy": cfg.strategy, "settings": recipe.settings, "batchnorm": cfg.batchnorm,
             "early_stopping_patience": cfg.early_stopping_patience, "data": data_hash(train_rows),
             "input": input_settings(data), "class_weights": class_weights}
    checkpoints = checkpoints or ws.finetune / "checkpoints" / role
    if cfg.strategy == "lp_ft":
        probe, tuned = lp_ft(model, recipe.objective, loader,
                             recipe.train.model_copy(update={"epochs": cfg.lp_epochs}),
                             recipe.train.model_copy(update={"epochs": cfg.train.epochs - cfg.lp_epochs}),
                             layer_decay=cfg.layer_decay, checkpoint_dir=checkpoints, callbacks=callbacks,
                             fingerprint_extra=extra)
        offset = len(probe.history)  # phase 2's epochs continue phase 1's numbering
        history = ([{**h, "phase": "probe"} for h in probe.history]
                   + [{**h, "epoch": int(h["epoch"]) + offset, "phase": "finetune"} for h in tuned.history])
        stops = {"stopped_epoch": tuned.stopped_epoch + offset if tuned.stopped_epoch is not None else None,
                 "probe_stopped_epoch": probe.stopped_epoch}
        seconds = probe.seconds + tuned.seconds
    else:
        result = fit(model, recipe.objective, loader, recipe.train, checkpoint_dir=checkpoints,
                     param_groups=recipe.param_groups, callbacks=callbacks, fingerprint_extra=extra,
                     description=f"finetune {role} {cfg.strategy}")
        history, seconds, stops = result.history, result.seconds, {"stopped_epoch": result.stopped_epoch}
    params, n_groups, frozen_groups = _trained_parameters(model, history, cfg.strategy)
    if cfg.strategy == "lora":
        merge_lora(model)  # the adapters folded in: a plain backbone that load_finetuned can rebuild
    val_prob, val_auc = _validation_scores(model, val_loader, y_val)
    early_stopping = (None if early is None else
                      {"monitor": "val_auc", "patience": cfg.early_stopping_patience, **stops})
    return _Trained(name=name, model=model, history=history, seconds=seconds, val_prob=val_prob, val_auc=val_auc,
                    settings=recipe.settings, n_groups=n_groups, frozen_groups=frozen_groups, params=params,
                    early_stopping=early_stopping, class_weights=class_weights)


def _class_weights(cfg: FinetuneConfig, train_rows: pd.DataFrame) -> list[float] | None:
    """``cfg.class_weight`` as one loss weight per class; ``balanced`` reads the source training labels."""
    if cfg.class_weight == "balanced":
        return balanced_class_weights(train_rows["label"].astype(int).to_numpy(), cfg.num_classes)
    return cfg.class_weight


def _trained_parameters(model: Backbone, history: list[dict], strategy: str) -> tuple[dict, int, int]:
    """Trained and total parameter elements, layer groups, and leading groups that never trained.

    ``requires_grad`` after training tells what trained, except under gradual unfreezing, whose callback has
    already thawed the group due for an epoch that never ran; there the epochs' ``trainable_groups`` count.

    Returns:
        ``(trainable_parameter_report(model), n_groups, frozen_groups)``.
    """
    groups = model.layer_groups()
    params = dict(model.named_parameters())
    report = trainable_parameter_report(model)
    if strategy == "gradual_unfreeze":
        top = min(max(int(h["trainable_groups"]) for h in history), len(groups))
        report["trainable"] = sum(params[n].numel() for group in groups[len(groups) - top:] for n in group)
        report["percent"] = 100.0 * report["trainable"] / report["total"]
        return report, len(groups), len(groups) - top
    frozen = 0
    for group in groups:
        if any(params[n].requires_grad for n in group):
            break
        frozen += 1
    return report, len(groups), frozen


def _negative_transfer_gate(cfg: FinetuneConfig, data: DataConfig, transfer: _Trained, train_rows: pd.DataFrame,
                            val_rows: pd.DataFrame, ws: Workspace) -> tuple[dict, _Trained | None]:
    """Train ``<arch>.scratch`` (strategy full, same budget) and ask :func:`negative_transfer` whether it wins.

    Args:
        cfg: ``scratch_baseline`` decides whether to check, ``on_negative_transfer`` what a loss means.
        data, train_rows, val_rows, ws: as for :func:`_finetune_one`.
        transfer: the model fine-tuned from the chosen backbone.

    Returns:
        The card's ``negative_transfer`` block ``{checked, transfer_val_auc, scratch_val_auc, delta, negative,
        message, fallback_applied}`` (plus ``scratch_backbone`` when one was trained), and the scratch model
        (``None`` when none was trained).
    """
    gate = {"checked": False, "transfer_val_auc": _finite_or_none(transfer.val_auc), "scratch_val_auc": None,
            "delta": None, "negative": None, "message": "", "fallback_applied": False}
    baseline_file = ws.finetune / "scratch_baseline.json"
    if not cfg.scratch_baseline or transfer.model.cfg.tag == "scratch":
        gate["message"] = ("not checked: finetune.scratch_baseline is false" if not cfg.scratch_baseline else
                           f"not checked: {transfer.name} is itself trained from scratch")
        baseline_file.unlink(missing_ok=True)  # a baseline from an earlier run would not describe this one
        return gate, None
    scratch_name = f"{transfer.model.cfg.arch}.scratch"
    baseline_cfg = FinetuneConfig(backbone=scratch_name, strategy="full", num_classes=cfg.num_classes,
                                  class_weight=cfg.class_weight, train=cfg.train,
                                  early_stopping_patience=cfg.early_stopping_patience)
    scratch = _finetune_one(scratch_name, baseline_cfg, data, train_rows, val_rows, ws, role="scratch")
    gate.update(scratch_backbone=scratch_name, scratch_val_auc=_finite_or_none(scratch.val_auc))
    _write_json(baseline_file, {"backbone": scratch_name, "strategy": "full", "val_auc": gate["scratch_val_auc"],
                                "early_stopping": scratch.early_stopping, "history": scratch.history,
                                "seconds": scratch.seconds})
    try:
        verdict = negative_transfer(transfer.val_auc, scratch.val_auc,
                                    transfer_name=f"{transfer.name} ({cfg.strategy})", scratch_name=scratch_name)
    except ValueError as exc:  # an undefined AUC (one class in the validation split) decides nothing
        gate["message"] = f"not checked: {exc}"
        log.warning("finetune: negative-transfer gate %s", gate["message"])
        return gate, scratch
    fallback = verdict["negative"] and cfg.on_negative_transfer == "fallback"
    gate.update(checked=True, delta=verdict["delta"], negative=verdict["negative"], message=verdict["message"],
                fallback_applied=fallback)
    if verdict["negative"]:
        log.warning("finetune: %s; %s", verdict["message"],
                    "the scratch model becomes the stage's model (on_negative_transfer: fallback)" if fallback
                    else "keeping the transferred model (on_negative_transfer: warn)")
    else:
        log.info("finetune: %s", verdict["message"])
    return gate, scratch


def _save_model(model: Backbone, stem: Path, card: dict) -> Path:
    """``model`` as every medtl model is stored (:func:`medtl.models.save_backbone`: the network in the file's
    header, so :func:`medtl.models.load_model` rebuilds it from the file alone), with ``card`` beside it.

    The card's ``arch`` and ``num_classes``, when given, must be the model's: the header records them."""
    for key in ("arch", "num_classes"):
        if key in card and card[key] != {"arch": model.cfg.arch, "num_classes": model.num_classes}[key]:
            raise ValueError(f"card {key} {card[key]!r} does not describe the model being saved")
    return save_backbone(model, stem, {k: v for k, v in card.items() if k not in ("arch", "num_classes")})


def load_finetuned(ws: Workspace) -> tuple[Backbone, dict]:
    """The fine-tuned model and its card, from ``ws.finetune`` (the file alone: no other weights needed)."""
    path = ws.finetune / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `medtl finetune` first")
    return load_model(path)


SELECTION_NOTE = ("The unsupervised scorers see only the target hospital's unlabeled images and the source hospitals' "
                  "labeled validation split. The oracle uses the target's labels: it is computed offline, for "
                  "reporting only, and never influences a pick.")


@dataclass
class AdaptCandidate:
    """One (method, epoch) model of the adaptation stage, as unsupervised selection sees it.

    Attributes:
        method: the adaptation run (:func:`adaptation_runs`): the method, or ``<method>-reg<value>`` when
            ``AdaptConfig.reg`` lists several values.
        epoch: the epoch after which the model was taken (1-based); None for AdaBN, which has no epochs.
        final: whether this is the run's final model (the one in ``adapt/<run>.safetensors``).
        weights: the candidate's safetensors file.
        arrays: the scorer inputs (``medtl.select.unsupervised.CANDIDATE_KEYS``): ``target_probabilities``
            (N_t, C), ``target_features`` (N_t, D), ``source_val_features`` (N_s, D), ``source_val_losses``
            (N_s,); the source ones are absent when the source hospitals have no validation images.
        target_auc: AUC on the target's labeled images (the offline oracle's criterion; NaN when undefined).
    """

    method: str
    epoch: int | None
    final: bool
    weights: Path
    arrays: dict[str, np.ndarray]
    target_auc: float

    @property
    def name(self) -> str:
        """``<method>@epoch<k>``, or the method alone for AdaBN."""
        return self.method if self.epoch is None else f"{self.method}@epoch{self.epoch}"


class _CandidateEvaluator:
    """Evaluates a candidate model in one inference pass over the target's unlabeled images, the source
    validation split and the target's labeled images; only the last part, for the offline oracle, reads
    target labels, and it never reaches the scorer inputs.

    Args:
        target_unlabeled: the target hospital's unlabeled rows (N_t), what the scorers see of the target.
        source_val: the source hospitals' labeled ``split == "val"`` rows (N_s), as fine-tuning validated on.
        target_labeled: the target hospital's labeled rows, for the oracle AUC only.
        model: any model of the stage (its ``cfg`` gives the input normalisation).
        data: the data section (image size, workers).
        device: ``TrainConfig.device``: inside ``fit`` the model must stay on the device it trains on.
    """

    def __init__(self, target_unlabeled: pd.DataFrame, source_val: pd.DataFrame, target_labeled: pd.DataFrame,
                 model: Backbone, data: DataConfig, device: str = "auto") -> None:
        self.device = device
        # one loader, built (and its images cached) once for the whole stage: per candidate, one pass
        self.loader = _eval_loader(pd.concat([target_unlabeled, source_val, target_labeled]), model, data)
        self.source_val = source_val
        self.n_target, self.n_source_val = len(target_unlabeled), len(source_val)
        self.y_source_val = source_val["label"].astype(int).to_numpy()
        self.n_target_labeled = len(target_labeled)
        self._y_target = target_labeled["label"].astype(int).to_numpy()
        if len(self._y_target) == 0:
            self.oracle_unavailable: str | None = "the target hospital has no labeled images"
        elif len(np.unique(self._y_target)) < 2:
            self.oracle_unavailable = "the target hospital's labeled images are all of one class (AUC undefined)"
        else:
            self.oracle_unavailable = None

    def __call__(self, model: Backbone) -> tuple[dict[str, np.ndarray], float]:
        """Scorer inputs and target AUC of ``model``.

        Returns:
            The arrays of :class:`AdaptCandidate` and the AUC on the target's labeled images (NaN when undefined).
        """
        features, probabilities = features_and_probabilities(model, self.loader, device=self.device)
        t, s = slice(0, self.n_target), slice(self.n_target, self.n_target + self.n_source_val)
        arrays = {"target_probabilities": probabilities[t], "target_features": features[t]}
        if self.n_source_val:
            arrays["source_val_features"] = features[s]
            arrays["source_val_losses"] = per_sample_cross_entropy(probabilities[s], self.y_source_val)
        auc = float("nan")
        if self.oracle_unavailable is None:
            prob = probabilities[self.n_target + self.n_source_val:, 1]
            auc = float(binary_metrics(self._y_target, prob, n_bootstrap=0)["auc"]["value"])
        return arrays, auc


class _CandidateRecorder:
    """``fit`` callback that keeps the model after every epoch as a candidate: its weights go to
    ``<store>/<method>-epoch<k>.safetensors`` (tagged with the run's fingerprint, so a resumed run can take
    back the epochs an earlier call trained) and its scorer inputs are computed at once.

    Args:
        method: the adaptation method.
        fingerprint: ``fit``'s run fingerprint for this method (:func:`medtl.train.core.run_fingerprint`).
        store: the folder of candidate weights.
        evaluate: the stage's :class:`_CandidateEvaluator`.
    """

    def __init__(self, method: str, fingerprint: str, store: Path, evaluate: _CandidateEvaluator) -> None:
        self.method, self.fingerprint, self.store, self.evaluate = method, fingerprint, store, evaluate
        self.candidates: dict[int, AdaptCandidate] = {}
        self.missing: list[dict] = []

    def path(self, epoch: int) -> Path:
        return self.store / f"{self.method}-epoch{epoch}.safetensors"

    def __call__(self, epoch: int, model: torch.nn.Module, logs: dict) -> None:
        self._add(epoch + 1, model, save=True)

    def _add(self, epoch: int, model: torch.nn.Module, save: bool) -> None:
        if save:
            atomic_save_tensors(model.state_dict(), self.path(epoch),
                                {"method": self.method, "epoch": str(epoch), "fingerprint": self.fingerprint})
        arrays, auc = self.evaluate(model)
        self.candidates[epoch] = AdaptCandidate(self.method, epoch, False, self.path(epoch), arrays, auc)

    def collect(self, epochs_done: int, final_model: Backbone, base: Backbone) -> list[AdaptCandidate]:
        """Every epoch's candidate after ``fit``: epochs that a resumed ``fit`` did not train in this call are
        taken back from their saved weights (the last one is ``final_model`` itself).

        Args:
            epochs_done: ``len(result.history)``.
            final_model: the model ``fit`` returned.
            base: the fine-tuned model, into a copy of which saved weights are loaded.

        Returns:
            The candidates in epoch order, the last one marked ``final``; unrecoverable epochs are in ``missing``.
        """
        for epoch in range(1, epochs_done + 1):
            if epoch in self.candidates:
                continue
            path = self.path(epoch)
            if epoch == epochs_done:
                self._add(epoch, final_model, save=_tensor_metadata(path).get("fingerprint") != self.fingerprint)
            elif _tensor_metadata(path).get("fingerprint") == self.fingerprint:
                model = copy.deepcopy(base)
                model.load_state_dict(load_tensors(path))
                self._add(epoch, model.eval(), save=False)
            else:
                reason = (f"epoch {epoch} was trained by an earlier call (fit resumed its checkpoint) and {path} "
                          "is missing or from other settings; delete "
                          f"{path.parent.parent / 'checkpoints' / self.method} to retrain it as a candidate")
                log.warning("adapt: %s", reason)
                self.missing.append({"method": self.method, "epoch": epoch, "reason": reason})
        if epochs_done in self.candidates:
            self.candidates[epochs_done].final = True
        return [self.candidates[e] for e in sorted(self.candidates)]


def _tensor_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; empty when it is absent or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (OSError, SafetensorError):
        return {}


def select_adapted(candidates: list[AdaptCandidate], scorer: str, seed: int = 0,
                   not_evaluated: list[dict] | None = None, oracle_unavailable: str | None = None) -> dict:
    """Rank the adaptation candidates with every unsupervised scorer and compare each pick with the oracle.

    The picks depend only on ``candidate.arrays`` (no target label); ``candidate.target_auc``, which does use
    the target's labels, only gives the oracle and the AUC columns, for reporting.

    Args:
        candidates: every (method, epoch) candidate, in stage order (ties go to the earlier one).
        scorer: the score whose pick is the stage's chosen model (``AdaptConfig.selection_scorer``).
        seed: random state of the DEV / IWCV domain classifier's folds.
        not_evaluated: candidates that could not be evaluated, ``{"method", "epoch", "reason"}`` each.
        oracle_unavailable: why no candidate has a target AUC, when none has.

    Returns:
        The ``adapt/selection.json`` payload (documented in :func:`run_adapt`).

    Raises:
        ValueError: when no candidate has a finite ``scorer`` score.
    """
    by_name = {c.name: c for c in candidates}
    try:
        selector = UnsupervisedSelector(scorer=scorer, seed=seed).fit({c.name: c.arrays for c in candidates})
    except ValueError as exc:
        raise ValueError(f"adapt: unsupervised selection failed: {exc}. Set adapt.selection_scorer to another "
                         "scorer, or raise data.val_fraction so the source validation split (which dev and iwcv "
                         "need) has more images") from exc
    auc = {c.name: c.target_auc for c in candidates}
    finite_auc = [c for c in candidates if np.isfinite(c.target_auc)]
    oracle_c = max(finite_auc, key=lambda c: c.target_auc) if finite_auc else None  # max keeps the first of ties

    def where(c: AdaptCandidate) -> dict:
        return {"candidate": c.name, "method": c.method, "epoch": c.epoch}

    picks = {}
    for score in UNSUPERVISED_SCORES:
        name = selector.picks_[score]
        if name is None:
            reasons = sorted({r[score] for r in selector.nan_reasons_.values() if score in r})
            picks[score] = {"candidate": None, "method": None, "epoch": None,
                            "reason": "no candidate has this score: " + "; ".join(reasons)}
            continue
        ranking = selector.rankings_[score]
        picks[score] = {**where(by_name[name]), "score": float(selector.scores_.loc[name, score]),
                        "target_auc": _finite_or_none(auc[name]),
                        "auc_gap_to_oracle": (_finite_or_none(oracle_c.target_auc - auc[name])
                                              if oracle_c is not None else None),
                        "oracle_rank": ranking.index(oracle_c.name) + 1 if oracle_c is not None else None}
    if oracle_c is not None:
        oracle = {**where(oracle_c), "target_auc": oracle_c.target_auc, "uses_target_labels": True}
    else:
        oracle = {"candidate": None, "method": None, "epoch": None, "target_auc": None, "uses_target_labels": True,
                  "reason": oracle_unavailable or "no candidate has a defined target AUC"}
    table = [{**where(c), "final": c.final, "chosen": c.name == selector.best_,
              **{score: _finite_or_none(selector.scores_.loc[c.name, score]) for score in UNSUPERVISED_SCORES},
              "target_auc": _finite_or_none(c.target_auc), "not_scored": selector.nan_reasons_.get(c.name, {})}
             for c in candidates]
    best = by_name[selector.best_]
    first = candidates[0].arrays
    # DEV's control variate can push its estimate below zero when the importance weights are extreme (few source
    # validation images, separable domains); a non-negative loss has no negative risk, so say so next to the pick
    warnings = [f"{c.name}: the DEV estimate is a negative risk ({-selector.scores_.loc[c.name, 'dev']:.3g}), "
                "impossible for a non-negative loss: its importance weights are degenerate (too few source "
                "validation images for the feature dimension); do not trust dev (nor iwcv) here"
                for c in candidates if selector.scores_.loc[c.name, "dev"] > 0]
    return {
        "note": SELECTION_NOTE,
        "scorer": scorer,
        "higher_is_better": True,
        "chosen": {**where(best), "scorer": scorer, "score": picks[scorer]["score"],
                   "target_auc": _finite_or_none(best.target_auc), "weights": "chosen.safetensors"},
        "picks": picks,
        "oracle": oracle,
        "candidates": table,
        "rankings": selector.rankings_,
        "not_evaluated": list(not_evaluated or []),
        "warnings": warnings,
        "inputs": {"target_unlabeled_images": len(first["target_probabilities"]),
                   "source_val_images": len(first.get("source_val_losses", ())),
                   "feature_dim": int(first["target_features"].shape[1])},
    }


# no adaptation-loss weight to sweep: the zero plugin, BatchNorm re-estimation and TENT's entropy-only objective
_UNWEIGHTED_METHODS = frozenset({"source_only", "adabn", "tent"})


def adaptation_runs(cfg: AdaptConfig) -> list[tuple[str, str, float | None]]:
    """The runs the adapt stage trains, in order: every loss plugin once per ``cfg.reg`` value, the other methods
    once.

    Args:
        cfg: the adapt section.

    Returns:
        ``(run, method, reg)`` per run (``reg`` None for source_only, adabn and tent); ``run`` names its files,
        predictions and candidates: the method, or ``<method>-reg<value>`` when ``cfg.reg`` lists several
        values.

    Examples:
        >>> [r for r, _, _ in adaptation_runs(AdaptConfig(methods=["source_only", "coral"], reg=[0.3, 1.0]))]
        ['source_only', 'coral-reg0.3', 'coral-reg1']
    """
    regs = cfg.reg_values
    runs = []
    for method in cfg.methods:
        if method in _UNWEIGHTED_METHODS:
            runs.append((method, method, None))
        elif len(regs) == 1:
            runs.append((method, method, regs[0]))
        else:
            runs += [(f"{method}-reg{reg:g}", method, reg) for reg in regs]
    return runs


@tracking.stage("adapt")
def run_adapt(cfg: AdaptConfig, data: DataConfig, ws: Workspace) -> dict:
    """Adapt the fine-tuned model to the target hospital's unlabeled images, and choose among the adapted
    models without the target's labels.

    Every method gets the same budget, and ``source_only`` is the same training with the zero plugin; a loss
    plugin trains once per ``cfg.reg`` value (:func:`adaptation_runs`). Each run's model after every epoch (AdaBN:
    its one model) is a *candidate*; the unsupervised scorers of
    :mod:`medtl.select.unsupervised` (ensv, dev, iwcv, snd, entropy; higher is better) rank all candidates, from one
    inference pass per candidate over the target's unlabeled images and the source hospitals' validation split
    (``split == "val"``). The pick of ``cfg.selection_scorer`` is the stage's chosen model. The *oracle* (the
    candidate with the best AUC on the target's labeled images) uses target labels and is computed offline, for
    reporting only: no pick reads a target label.

    Writes to ``ws.adapt``:

    * ``<run>.safetensors`` and ``predictions.parquet``: each run's final model and its predictions on
      :func:`evaluation_rows` (column ``model`` = run), unchanged by selection.
    * ``candidates/<run>-epoch<k>.safetensors``: every trained candidate's weights (one model file each;
      AdaBN's candidate is ``adabn.safetensors`` itself). A later call whose ``fit`` resumes a checkpoint takes
      the epochs it does not retrain back from here.
    * ``chosen.safetensors``: the chosen candidate's weights (metadata: method, epoch, scorer, score, backbone,
      num_classes); :func:`load_adapted` loads it.
    * ``selection.json`` (JSON has no NaN: undefined numbers are null)::

        note            what the scorers see, and that the oracle uses labels for reporting only
        scorer          cfg.selection_scorer
        higher_is_better  true, for every score
        chosen          {candidate, method, epoch, scorer, score, target_auc, weights: "chosen.safetensors"}
        picks           {entropy|snd|dev|iwcv|ensv: {candidate, method, epoch, score, target_auc,
                         auc_gap_to_oracle (oracle AUC - this pick's), oracle_rank (1 = the scorer ranks the
                         oracle first)}}; a scorer no candidate has: {candidate: null, ..., reason}
        oracle          {candidate, method, epoch, target_auc, uses_target_labels: true} (candidate null + reason
                         when the target has no labeled images of both classes)
        candidates      one row per candidate, in stage order: {candidate, method, epoch, final, chosen, entropy,
                         snd, dev, iwcv, ensv, target_auc, not_scored: {score: why it is null}}
        rankings        {score: candidate names, best first}
        not_evaluated   [{method, epoch, reason}]: epochs a resumed run could not take back
        warnings        [str]: e.g. a candidate whose DEV estimate is a negative risk (degenerate weights)
        inputs          {target_unlabeled_images, source_val_images, feature_dim, target_labeled_images
                         (oracle only)}

      A candidate is named ``<run>@epoch<k>`` (``epoch`` 1-based), or ``adabn`` (``epoch`` null); its
      ``method`` field is the run.
    * ``target_probabilities.safetensors``: each candidate's (N_t, C) probabilities on the target's unlabeled
      images, keyed by candidate name (what ensv, snd and entropy read).
    * ``summary.json``: ``target_hospital``, ``methods`` (the runs), ``reg``, ``target_auc`` (each run's final
      model), ``details`` (per run), ``chosen`` ``{method, epoch, scorer}`` and ``selection`` (the short form:
      ``scorer``, ``chosen``, ``picks`` and ``oracle`` as ``{method, epoch, target_auc}``,
      ``n_candidates``, ``file: "selection.json"``).

    Args:
        cfg: the adapt section (methods, reg, selection_scorer, train).
        data: the data section (which hospitals are source and target).
        ws: the run's workspace; needs the fine-tune stage's model.

    Returns:
        ``{"target_hospital", "target_auc", "chosen", "selection"}`` as in ``summary.json``.

    Raises:
        ValueError: when the target has no unlabeled images, or no candidate has a finite
            ``cfg.selection_scorer`` score.
    """
    from medtl.ingest.folder import file_sha256

    if data.target_hospital is None:
        raise ValueError("adapt adapts to a target hospital, and data.target_hospital is null (a single-hospital "
                         "study): set data.target_hospital, or skip this stage (the fine-tuned model is deployed)")
    manifest = load_split_manifest(ws, data)
    base, card = load_finetuned(ws)
    source = manifest[(manifest["role"] == "source") & (manifest["split"] == "train")]
    target = manifest[(manifest["role"] == "target") & (manifest["split"] == "unlabeled")]
    if len(target) == 0:
        raise ValueError(f"hospital {data.target_hospital!r} has no unlabeled images to adapt on")
    eval_rows = evaluation_rows(manifest)
    evaluate = _CandidateEvaluator(
        target, manifest[(manifest["role"] == "source") & (manifest["split"] == "val")],
        manifest[(manifest["role"] == "target") & manifest["label"].notna()], base, data, device=cfg.train.device)
    predictions, summary, candidates, not_evaluated = [], {}, [], []
    # The fine-tuned weights themselves (not their name), the images and the transforms: a re-run after any of
    # them changed retrains instead of resuming checkpoints adapted from another model.
    trained_on = {"base": file_sha256(ws.finetune / "model.safetensors"), "source": data_hash(source),
                  "target": data_hash(target), "input": input_settings(data)}
    task = Supervised(class_weights=card.get("class_weights"))  # the task the model was fine-tuned on
    runs = adaptation_runs(cfg)
    for run, method, reg in runs:
        model = copy.deepcopy(base)
        if method == "adabn":
            n_bn = recompute_batchnorm_statistics(
                model, (b["image"] for b in _eval_loader(target, model, data)))
            summary[method] = {"batchnorm_layers": n_bn, "target_images": len(target)}
            arrays, auc = evaluate(model)
            candidates.append(AdaptCandidate(method, None, True, ws.adapt / f"{method}.safetensors", arrays, auc))
        elif method == "tent":
            # target images only, un-augmented as at test time; BatchNorm affine parameters are all that train
            params = tent_parameters(model, track_target_statistics=True)
            t = eval_transform(data.spatial_dims, data.image_size, model.cfg.mean, model.cfg.std)
            loader = make_loader(_dataset(target, t), cfg.train.batch_size, shuffle=True,
                                 num_workers=data.num_workers, drop_last=len(target) > cfg.train.batch_size)
            extra = {"method": method, **trained_on}
            recorder = _CandidateRecorder(method, run_fingerprint(cfg.train, extra), ws.adapt / "candidates", evaluate)
            result = fit(model, EntropyMinimisation(), loader, cfg.train, param_groups=[{"params": params}],
                         checkpoint_dir=ws.adapt / "checkpoints" / method,
                         callbacks=[recorder, *tracking.epoch_callbacks(f"{method}/")],
                         fingerprint_extra=extra, description="adapt tent")
            summary[method] = {"history": result.history, "seconds": result.seconds,
                               "trained_parameters": sum(p.numel() for p in params)}
            candidates += recorder.collect(len(result.history), model, base)
            not_evaluated += recorder.missing
        else:
            settings = cfg.plugin_settings.get(method, {})
            plugin = build_adaptation_loss(method, model.num_features, **settings)
            if plugin.uses_strong_view:
                t = weak_strong_transform(data.spatial_dims, data.image_size, model.cfg.mean, model.cfg.std,
                                          data.augment)
                target_loader = make_loader(_dataset(target, t), cfg.train.batch_size, shuffle=True,
                                            num_workers=data.num_workers, drop_last=True)
            else:
                target_loader = _train_loader(target, model, data, cfg.train.batch_size)
            loader = PairedLoader(_train_loader(source, model, data, cfg.train.batch_size), target_loader)
            extra = {"method": method, "reg": reg, "settings": settings, **trained_on,
                     "class_weights": card.get("class_weights")}
            recorder = _CandidateRecorder(run, run_fingerprint(cfg.train, extra), ws.adapt / "candidates", evaluate)
            result = fit(model, TaskWithAdaptation(plugin, reg=reg or 0.0, task=task), loader, cfg.train,
                         checkpoint_dir=ws.adapt / "checkpoints" / run,
                         callbacks=[recorder, *tracking.epoch_callbacks(f"{run}/")],
                         fingerprint_extra=extra, description=f"adapt {run}")
            summary[run] = {"history": result.history, "seconds": result.seconds, "reg": reg, "settings": settings}
            candidates += recorder.collect(len(result.history), model, base)
            not_evaluated += recorder.missing
        atomic_save_tensors(model.state_dict(), ws.adapt / f"{run}.safetensors", {"method": run})
        predictions.append(_predict_all(model, eval_rows, data, run))
    frame = pd.concat(predictions, ignore_index=True)
    _write_parquet(frame, ws.adapt / "predictions.parquet")
    target_auc = {m: binary_metrics(g["label"].to_numpy(), g["prob"].to_numpy(), n_bootstrap=0)["auc"]["value"]
                  for m, g in frame[frame["role"] == "target"].groupby("model")}

    scorer, fallback = cfg.selection_scorer, None
    try:
        selection = select_adapted(candidates, scorer, seed=cfg.train.seed, not_evaluated=not_evaluated,
                                   oracle_unavailable=evaluate.oracle_unavailable)
    except ValueError as exc:
        if scorer == "ensv":
            raise
        # ensv needs only the candidates' target predictions, which every candidate has: the stage still deploys
        # a label-free pick, and says which scorer made it and why
        fallback = f"{scorer} could not rank the candidates ({exc}); ensv chose instead"
        log.warning("adapt: %s", fallback)
        scorer = "ensv"
        selection = select_adapted(candidates, scorer, seed=cfg.train.seed, not_evaluated=not_evaluated,
                                   oracle_unavailable=evaluate.oracle_unavailable)
    selection.update(target_hospital=data.target_hospital, fallback=fallback, base_sha256=trained_on["base"])
    selection["inputs"]["target_labeled_images"] = evaluate.n_target_labeled
    chosen = next(c for c in candidates if c.name == selection["chosen"]["candidate"])
    chosen_model = copy.deepcopy(base)
    chosen_model.load_state_dict(load_tensors(chosen.weights))
    _save_model(chosen_model, ws.adapt / "chosen", {
        "candidate": chosen.name, "method": chosen.method, "epoch": chosen.epoch, "scorer": scorer,
        "score": selection["chosen"]["score"], "fallback": fallback, "backbone": card["backbone"],
        "adapted_from": {"file": "finetune/model.safetensors", "sha256": trained_on["base"]},
        "target_hospital": data.target_hospital, "created_at": datetime.now(timezone.utc).isoformat(),
        "medtl_version": medtl.__version__})
    _write_json(ws.adapt / "selection.json", selection)
    # what the label-free scorers that read predictions only (ensv, entropy, snd) saw, so a pick over another
    # pool, e.g. a subset of the runs, can be recomputed without inference
    atomic_save_tensors({c.name: torch.from_numpy(np.ascontiguousarray(c.arrays["target_probabilities"]))
                         for c in candidates}, ws.adapt / "target_probabilities.safetensors",
                        {"note": "candidate name -> (N_target_unlabeled, C) probabilities, in manifest order"})
    short = {"scorer": scorer, "fallback": fallback,
             "chosen": {k: selection["chosen"][k] for k in ("method", "epoch", "scorer")},
             "picks": {s: {k: p.get(k) for k in ("method", "epoch", "target_auc")}
                       for s, p in selection["picks"].items()},
             "oracle": {k: selection["oracle"][k] for k in ("method", "epoch", "target_auc")},
             "n_candidates": len(candidates), "file": "selection.json"}
    target_labeled = manifest[(manifest["role"] == "target") & manifest["label"].notna()]
    _write_json(ws.adapt / "summary.json", {"target_hospital": data.target_hospital,
                                            "methods": [run for run, _, _ in runs],
                                            "reg": cfg.reg, "target_auc": target_auc, "details": summary,
                                            "chosen": short["chosen"], "selection": short,
                                            "base_sha256": trained_on["base"],
                                            # training and label-free selection; the oracle's reads are apart
                                            "images_read": images_read(source, evaluate.source_val, target),
                                            "oracle_images_read": images_read(target_labeled)})
    tracking.log_model(ws.adapt / "chosen.safetensors", ws.adapt / "selection.json", ws.adapt / "summary.json")
    log.info("adapt: target AUC %s", ", ".join(f"{m}={a:.3f}" for m, a in target_auc.items()))
    log.info("adapt: unsupervised picks %s; chosen %s by %s; oracle (uses target labels, reporting only) %s",
             ", ".join(f"{s}={p['candidate']}" for s, p in selection["picks"].items()),
             selection["chosen"]["candidate"], scorer, selection["oracle"]["candidate"])
    return {"target_hospital": data.target_hospital, "target_auc": target_auc, "chosen": short["chosen"],
            "selection": short}


def load_adapted(ws: Workspace) -> tuple[Backbone, dict]:
    """The adaptation stage's chosen model (``adapt/chosen.safetensors``, loadable on its own like every medtl
    model) and what selection says of it.

    Args:
        ws: a workspace where :func:`run_adapt` ran.

    Returns:
        The model in eval mode and its card: ``candidate``, ``method``, ``epoch``, ``scorer``, ``score``,
        ``fallback``, ``backbone``, ``num_classes``, ``adapted_from`` ``{file, sha256}``, ...
    """
    path = ws.adapt / "chosen.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `medtl adapt` first")
    return load_model(path)


@tracking.stage("report")
def run_report(config: PipelineConfig, ws: Workspace) -> dict:
    """Validation report (HTML, PDF and JSON) of the deployed model (:mod:`medtl.deploy`), with the fine-tuned
    model before adaptation and every adaptation run as comparison rows.

    The context comes from the manifest (cohort, content hashes, image statistics for the shift diagnostics, the
    acquisition fields of the shortcut audit, failure-example arrays), the ingest ledger, the select ranking, the
    fine-tune card (with its negative-transfer block), the adapt summary when adaptation built the deployed model,
    ``deploy/`` (the deployed model's card, predictions and label-free analyses), what every stage recorded it
    read (the data-use table) and ``config.report`` (intended use, site limitations). When ``deploy/`` is missing
    or out of date (:func:`medtl.deploy.is_current`: another trained model, manifest or setting), the deploy step
    runs first, so the report always describes the model that is deployed. When ``loho/summary.json`` exists (the
    pipeline with ``report.leave_one_hospital_out``, or ``medtl loho``), the report also has its
    leave-one-hospital-out section. Sections whose stage did not run (adaptation in a single-hospital study) say so.
    """
    from medtl import deploy
    from medtl.evaluate.report import build_report
    from medtl.evaluate.shortcut import shortcut_audit

    data = config.data
    manifest = load_split_manifest(ws, data)
    if not deploy.is_current(config, ws):
        log.info("report: deploy/ is missing or does not describe the current models and settings; deploying first")
        deploy.run_deploy(config, ws)
    deployed = json.loads((ws.deploy / "model.json").read_text())
    adapted = deployed["origin"]["stage"] == "adapt"
    parts = [ws.deploy / "predictions.parquet", ws.finetune / "predictions.parquet",
             *([ws.adapt / "predictions.parquet"] if adapted else [])]
    predictions = _with_image_columns(pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True),
                                      evaluation_rows(manifest))
    predicted_models = set(predictions["model"])
    card = json.loads((ws.finetune / "model.json").read_text())
    ranking = json.loads((ws.select / "ranking.json").read_text()) if (ws.select / "ranking.json").exists() else {}
    analysis = json.loads((ws.deploy / "analysis.json").read_text())
    context = {
        "title": config.report.title,
        "intended_use": config.report.intended_use,
        "primary_model": deploy.MODEL_NAME,
        "comparison_model": deploy.COMPARISON_MODEL,
        "threshold": deployed["threshold"],
        "threshold_source": deployed["threshold_source"],
        "deployed": {k: deployed[k] for k in ("origin", "backbone", "calibration", "label_shift", "sha256")}
                    | {"file": "deploy/model.safetensors"},
        "cohort": _cohort_table(manifest),
        "ingest": _ingest_accounting(ws),
        "backbone_ranking": ranking.get("ranking", []),
        "backbone_selection": {k: ranking.get(k) for k in ("rank_by", "best", "target_aware")},
        # the card without its history and what only a machine needs (the header that rebuilds the network)
        "finetune": {k: v for k, v in card.items() if k not in _CARD_KEYS_NOT_SHOWN},
        "adaptation": _adaptation_context(config, ws, adapted, predicted_models, deployed),
        "data_use": _data_use(config, ws, manifest, deployed),
        "prevalence": analysis["prevalence"],
        "performance_estimates": analysis["performance_estimates"],
        "shortcut_audit": shortcut_audit(manifest, n_bootstrap=config.report.n_bootstrap,
                                         confidence=config.report.confidence, pooled=list(data.source_hospitals)),
        "shift_diagnostics": _shift_context(manifest, data, config.report.shift_images_per_site),
        "limitations": [*_limitations(config, manifest), *config.report.limitations],
        "provenance": _report_provenance(config, ws, manifest),
    }
    loho = ws.loho / "summary.json"
    if loho.exists():  # whoever wrote it (the flow or `medtl loho`), a reviewer should see it
        context["leave_one_hospital_out"] = json.loads(loho.read_text())
    result = build_report(predictions, context, config.report, ws.report)
    log.info("report: %s%s", result.html_path, f" and {result.pdf_path}" if result.pdf_path else "")
    tracking.log_artifacts([result.html_path, result.json_path, *([result.pdf_path] if result.pdf_path else [])],
                           "report")
    return {"html": str(result.html_path), "json": str(result.json_path),
            "pdf": str(result.pdf_path) if result.pdf_path else None, "summary_markdown": result.summary_markdown}


_CARD_KEYS_NOT_SHOWN = frozenset({"history", "threshold_source", "model", "in_chans", "spatial_dims", "mean", "std",
                                  "name", "weights", "license", "description", "images_read"})


def _adaptation_context(config: PipelineConfig, ws: Workspace, adapted: bool, predicted_models: set[str],
                        deployed: dict) -> dict:
    """The report's adaptation block: the runs, how the deployed one was chosen; ``ran: false`` with the reason
    when adaptation did not build the deployed model."""
    target = config.data.target_hospital
    if not adapted:
        reason = "; ".join(deployed["origin"]["notes"]) or "adaptation did not run"
        return {"ran": False, "target_hospital": target, "methods": [], "reason": reason}
    selection_note, selection_rows = _adapt_selection(ws)
    return {"ran": True, "target_hospital": target,
            "methods": [run for run, _, _ in adaptation_runs(config.adapt) if run in predicted_models],
            "deployed_candidate": deployed["origin"].get("candidate"),
            "notes": [f"Every trained method continues from the fine-tuned model for {config.adapt.train.epochs} "
                      f"epochs on source labels plus unlabeled {target} images (reg={config.adapt.reg}); source_only "
                      "uses the zero plugin with the same budget; AdaBN only re-estimates BatchNorm statistics.",
                      *selection_note],
            "selection": selection_rows}


# the data-use table's columns: stage → (what the report calls it, its column heading, the file and the key
# holding its reads)
_DATA_USE = {
    "ssl": ("self-supervised pretraining", "SSL", ("pretrain", "card.json"), ("images_read",)),
    "selection": ("backbone selection", "selection", ("select", "ranking.json"), ("images_read",)),
    "finetuning": ("fine-tuning", "fine-tuning", ("finetune", "model.json"), ("images_read",)),
    "adaptation": ("adaptation", "adaptation", ("adapt", "summary.json"), ("images_read",)),
    "threshold": ("threshold and calibration", "threshold", ("deploy", "model.json"),
                  ("images_read", "threshold_and_calibration")),
    "prevalence": ("target prevalence and label-free estimates", "prevalence", ("deploy", "model.json"),
                   ("images_read", "target_unlabeled")),
    "evaluation": ("evaluation", "evaluation", ("deploy", "model.json"), ("images_read", "evaluation")),
    "loho": ("leave-one-hospital-out (separate models)", "LOHO", ("loho", "summary.json"), ("images_read",)),
}


def _data_use(config: PipelineConfig, ws: Workspace, manifest: pd.DataFrame, deployed: dict) -> dict:
    """For each hospital, how many of its images each stage read, from what each stage recorded; a stage that did
    not run (or did not build the deployed model) is ``None``."""
    # SSL counts when its backbone was a candidate (its features were ranked) or is the deployed model's start
    built_deployed = {"ssl": f"{config.pretrain.arch}.ssl" in config.select.candidates
                      or str(deployed.get("backbone") or "").endswith(".ssl"),
                      "adaptation": deployed["origin"]["stage"] == "adapt"}
    stages, notes = {}, []
    for key, (label, heading, (folder, name), path) in _DATA_USE.items():
        file = getattr(ws, folder) / name
        if not built_deployed.get(key, True) or not file.exists():
            stages[key] = {"label": label, "heading": heading, "ran": False, "images": {}}
            continue
        value = json.loads(file.read_text())
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        stages[key] = {"label": label, "heading": heading, "ran": value is not None, "images": value or {},
                       **({} if value is not None else {"note": f"{file.name} records no images_read (written by an "
                                                                "older medtl): re-run the stage"})}
    if stages["adaptation"]["ran"]:
        oracle = json.loads((ws.adapt / "summary.json").read_text()).get("oracle_images_read") or {}
        if oracle:
            notes.append("The adapt stage also scored its candidates on the target's labeled images ("
                         + ", ".join(f"{h}: {n}" for h, n in oracle.items()) + ") to report the oracle row; no "
                         "label-free pick reads them.")
    if stages["ssl"]["ran"]:
        notes.append(f"Self-supervised pretraining reads images without their labels; the deployed model starts from "
                     f"{deployed.get('backbone')}.")
    roles = manifest.groupby("hospital")["role"].first().to_dict()
    order = ("source", "target", "external")  # the report's order of hospitals
    rows = [{"hospital": h, "role": roles[h], "images": int(n),
             "read": {k: int(v["images"].get(h, 0)) if v["ran"] else None for k, v in stages.items()}}
            for h, n in sorted(manifest.groupby("hospital").size().items(), key=lambda hn: (order.index(roles[hn[0]]),
                                                                                           hn[0]))]
    return {"stages": {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in stages.items()},
            "hospitals": rows, "notes": notes}


def evaluation_sites(ws: Workspace) -> list[str]:
    """The hospitals the deployed model was evaluated at (``deploy/predictions.parquet``), sorted.

    Args:
        ws: the run's workspace.

    Returns:
        Hospital names as the manifest has them.
    """
    path = ws.deploy / "predictions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `medtl deploy` first")
    return sorted(pd.read_parquet(path, columns=["hospital"])["hospital"].astype(str).unique())


def run_evaluate_site(cfg: ReportConfig, ws: Workspace, hospital: str) -> dict:
    """The deployed model's metrics at one hospital, with the report's patient-level bootstrap CIs, written to
    ``evaluate/<hospital>.json``: equal to that hospital's ``per_hospital`` entry of ``report.json``.

    Args:
        cfg: the ``report`` section (bootstrap size, confidence level, calibration bins).
        ws: the run's workspace (reads ``deploy/predictions.parquet`` and the threshold in ``deploy/model.json``).
        hospital: one of :func:`evaluation_sites`.

    Returns:
        ``{"hospital", "model", "threshold", "metrics", "file"}``; ``metrics`` is
        :func:`medtl.evaluate.report.site_metrics` output.
    """
    from medtl.evaluate.report import site_metrics

    predictions = pd.read_parquet(ws.deploy / "predictions.parquet")
    rows = predictions[predictions["hospital"].astype(str) == hospital]
    if len(rows) == 0:
        raise ValueError(f"no predictions of the deployed model at {hospital!r}; evaluated hospitals: "
                         f"{evaluation_sites(ws)}")
    threshold = float(json.loads((ws.deploy / "model.json").read_text())["threshold"])
    payload = {"hospital": hospital, "model": "deployed", "threshold": threshold,
               "metrics": site_metrics(rows, threshold, cfg)}
    # a readable name that stays unique when two hospitals differ only in characters a file name cannot hold
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in hospital)[:60]
    path = ws.evaluate / f"{stem}-{hashlib.sha256(hospital.encode()).hexdigest()[:8]}.json"
    _write_json(path, payload)
    log.info("evaluate: %s AUC %s (n=%d)", hospital, payload["metrics"]["auc"]["value"], len(rows))
    return {**payload, "file": str(path)}


def _with_image_columns(predictions: pd.DataFrame, eval_rows: pd.DataFrame) -> pd.DataFrame:
    """Attach each prediction's stored array, de-identified image id, vendor, sex and age
    (blank / NaN where not recorded).

    :func:`_predict_all` writes one block per model over ``evaluation_rows(manifest)`` in manifest order, so a
    block lines up row by row with ``eval_rows``. That is checked on hospital, patient and label; a block that
    does not line up (the manifest changed after the model was evaluated) keeps no image columns, and the report
    then shows its failure examples as unavailable instead of someone else's image.

    Args:
        predictions: the concatenated prediction files.
        eval_rows: ``evaluation_rows`` of the current split manifest.

    Returns:
        ``predictions`` with ``image``, ``image_id`` (the array's file stem: the de-identified SOP or series UID)
        and ``vendor``, ``sex`` and ``age`` columns.
    """
    attributes = {"image": eval_rows["image"].astype(str).to_numpy(),
                  "image_id": [Path(path).stem for path in eval_rows["image"]],
                  "vendor": eval_rows["vendor"].astype(str).to_numpy()}
    for name in ("sex", "age"):
        attributes[name] = eval_rows[name].to_numpy()
    keys = (eval_rows["hospital"].astype(str).to_numpy(), eval_rows["patient_id"].astype(str).to_numpy(),
            eval_rows["label"].astype(int).to_numpy())
    blocks = []
    for model, block in predictions.groupby("model", sort=False):
        aligned = len(block) == len(eval_rows) and all(
            np.array_equal(block[c].astype(t).to_numpy(), k)
            for c, t, k in zip(("hospital", "patient_id", "label"), (str, str, int), keys))
        if aligned:
            block = block.assign(**attributes)
        else:
            log.warning("report: predictions of %s do not line up with the current manifest (re-ingested since "
                        "they were written?); re-run finetune/adapt to get its failure examples", model)
        blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def _adapt_selection(ws: Workspace) -> tuple[list[str], list[dict]]:
    """The adapt stage's unsupervised model choice, from ``adapt/selection.json`` (nothing without it): one
    sentence naming the deployed model, and each scorer's pick next to the offline oracle's."""
    path = ws.adapt / "selection.json"
    if not path.exists():
        return [], []
    selection = json.loads(path.read_text())
    chosen = selection["chosen"]
    epoch = f" (epoch {chosen['epoch']})" if chosen.get("epoch") is not None else ""  # AdaBN trains no epochs
    note = (f"Without target labels, the {selection['scorer']} score chose {chosen['method']}{epoch} as the adapted "
            "model to deploy.")
    rows = [{"scorer": scorer, "candidate": pick.get("candidate"), "target_auc": pick.get("target_auc"),
             "auc_gap_to_oracle": pick.get("auc_gap_to_oracle"), "chosen": scorer == selection["scorer"],
             "uses_target_labels": False}
            for scorer, pick in selection["picks"].items()]
    oracle = selection["oracle"]
    return [note], rows + [{"scorer": "oracle", "candidate": oracle.get("candidate"),
                            "target_auc": oracle.get("target_auc"),
                            "auc_gap_to_oracle": 0.0 if oracle.get("candidate") else None, "chosen": False,
                            "uses_target_labels": True}]


def _shift_context(manifest: pd.DataFrame, data: DataConfig, images_per_site: int) -> dict:
    """Shift diagnostics of every hospital against the source hospitals, on image statistics of the stored arrays.

    Args:
        manifest: the split manifest (with ``role``).
        data: names the source (reference) hospitals.
        images_per_site: at most this many images per hospital, drawn with a fixed seed.

    Returns:
        :func:`medtl.evaluate.shift.shift_diagnostics` output plus ``images_per_site`` and ``unreadable``.
    """
    from medtl.evaluate.shift import image_statistics, shift_diagnostics

    sample = pd.concat([rows if len(rows) <= images_per_site else rows.sample(n=images_per_site, random_state=0)
                        for _, rows in manifest.groupby("hospital", sort=True)])
    features, hospitals, unreadable = [], [], 0
    for path, hospital in zip(sample["image"], sample["hospital"]):
        try:
            features.append(image_statistics(np.load(path, allow_pickle=False)))
        except (OSError, ValueError) as exc:  # one damaged array must not cost the whole report
            log.warning("report: shift diagnostics skip %s: %s", Path(path).name, exc)
            unreadable += 1
            continue
        hospitals.append(hospital)
    result = shift_diagnostics(np.stack(features), np.asarray(hospitals), list(data.source_hospitals))
    return {**result, "images_per_site": images_per_site, "unreadable": unreadable}


def _report_provenance(config: PipelineConfig, ws: Workspace, manifest: pd.DataFrame) -> dict:
    """Code version, configuration and data hashes, and per-hospital content hash and study dates."""
    sites = []
    for hospital, rows in manifest.groupby("hospital", sort=True):
        dates = pd.to_datetime(rows["study_date"], errors="coerce").dropna()
        sites.append({"hospital": hospital, "content_sha256": data_hash(rows),
                      "study_dates": (f"{dates.min():%Y-%m-%d} to {dates.max():%Y-%m-%d}" if len(dates) else None)})
    return {"medtl_version": medtl.__version__, "git_commit": _git_commit(),
            "config_sha256": hashlib.sha256(config.model_dump_json().encode()).hexdigest(),
            "data_sha256": data_hash(manifest),
            "ingested_at": datetime.fromtimestamp(ws.manifest.stat().st_mtime, timezone.utc).isoformat(
                timespec="seconds"),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sites": sites}


def _git_commit() -> str | None:
    """The commit of the medtl checkout that runs (``-dirty`` with uncommitted changes); None when medtl is not
    run from its own git checkout (an installed wheel, or git missing)."""
    import subprocess

    root = Path(medtl.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # a wheel installed inside some other repository must not report that repository's commit
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _cohort_table(manifest: pd.DataFrame) -> list[dict]:
    """One row per hospital, source hospitals first, then the target, then external ones (the report's order)."""
    rows = []
    for hospital, g in manifest.groupby("hospital", sort=True):
        labeled = g[g["label"].notna()]
        rows.append({"hospital": hospital, "role": g["role"].iloc[0], "vendor": g["vendor"].iloc[0],
                     "model": g["model"].iloc[0], "n_images": len(g), "n_patients": g["patient_id"].nunique(),
                     "n_labeled": len(labeled),
                     "prevalence": float(labeled["label"].astype(float).mean()) if len(labeled) else None})
    roles = ("source", "target", "external")
    return sorted(rows, key=lambda row: (roles.index(row["role"]), row["hospital"]))


def _ingest_accounting(ws: Workspace) -> dict:
    from medtl.ingest import load_ledger

    ledger = load_ledger(ws)
    counts = ledger["status"].value_counts()
    quarantined = ledger[ledger["status"] == "quarantined"]
    return {"files_in": len(ledger), "ingested": int(counts.get("ingested", 0)),
            "quarantined": int(counts.get("quarantined", 0)), "duplicates": int(counts.get("duplicate", 0)),
            "skipped": int(counts.get("skipped", 0)), "to_retry": int(counts.get("retry", 0)),
            "quarantine_reasons": quarantined["reason"].str.split(":").str[0].value_counts().to_dict()}


def _recorded(values: pd.Series) -> bool:
    """Whether any value is present (the manifest stores "" or NaN where de-identification removed it)."""
    return bool(values.replace("", np.nan).notna().any())


def _limitations(config: PipelineConfig, manifest: pd.DataFrame) -> list[str]:
    notes = ["Operating threshold chosen on the source validation split; sensitivity/specificity at other "
             "hospitals show how well it transfers, not a re-tuned operating point.",
             "Confidence intervals are patient-level bootstrap percentile intervals "
             f"({config.report.n_bootstrap} resamples); small hospitals give wide intervals."]
    unrecorded = [name for name in ("sex", "age") if not _recorded(manifest[name])]
    if unrecorded:
        notes.append(f"Patient {' and '.join(unrecorded)} are not recorded in the manifest, so performance could "
                     "not be checked across them.")
    if config.ingest.uses_synthetic_cohort:
        notes.insert(0, "Data are the embedded SYNTHETIC cohort (medtl synth): these figures validate the "
                        "pipeline, not a clinical model.")
    return notes


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in order, without Prefect (the Prefect flow in ``flows/pipeline.py`` does the same), inside
    one tracking run (``config.tracking``) with a nested run per stage."""
    ws = Workspace(config.workdir)
    with tracking.pipeline_run(config):
        if config.ingest.uses_synthetic_cohort:
            run_synth(config.synth, ws)
        run_ingest(config.ingest, ws)
        if f"{config.pretrain.arch}.ssl" in config.select.candidates:
            run_pretrain(config.pretrain, config.data, ws)
        run_select(config.select, config.data, ws)
        run_finetune(config.finetune, config.data, ws)
        if config.report.leave_one_hospital_out:
            run_leave_one_hospital_out(config.finetune, config.data, ws, config.report.n_bootstrap,
                                       config.report.confidence)
        if config.data.target_hospital is not None:  # a single-hospital study has no hospital to adapt to
            run_adapt(config.adapt, config.data, ws)
        from medtl.deploy import run_deploy

        run_deploy(config, ws)
        return run_report(config, ws)
