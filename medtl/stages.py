"""One function per pipeline stage. The CLI, notebooks and every Prefect task call these.

Each stage reads its inputs from, and writes its outputs to, a :class:`~medtl.workspace.Workspace`,
and returns a small JSON-able summary.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

import medtl
from medtl.adapt import (EntropyMinimisation, build_adaptation_loss, recompute_batchnorm_statistics,
                         tent_parameters)
from medtl.config import (AdaptConfig, DataConfig, FinetuneConfig, IngestConfig, PipelineConfig, PretrainConfig,
                          SelectConfig, SynthConfig)
from medtl.data.datasets import PairedLoader, SampleDataset, assign_splits, make_loader, to_records
from medtl.data.transforms import eval_transform, ssl_views_transform, train_transform, weak_strong_transform
from medtl.evaluate.metrics import binary_metrics, youden_threshold
from medtl.finetune import optimizer_groups
from medtl.models import Backbone, create_backbone, save_backbone
from medtl.models.registry import get_backbone_cfg
from medtl.select import SCORES, BackboneSelector
from medtl.ssl import KnnMonitor, build_ssl_objective
from medtl.train import Supervised, TaskWithAdaptation, fit
from medtl.train.checkpoint import atomic_save_tensors
from medtl.train.inference import embed_with_source_head, positive_probability
from medtl.workspace import Workspace

log = logging.getLogger("medtl")


# ----------------------------------------------------------------------------------------------- data


def load_split_manifest(ws: Workspace, data: DataConfig) -> pd.DataFrame:
    """The ingested manifest with a patient-level ``split`` and each hospital's ``role``."""
    from medtl.ingest import load_manifest

    if not ws.manifest.exists():
        raise FileNotFoundError(f"{ws.manifest} not found: run `medtl ingest` (or the ingest flow) first")
    manifest = assign_splits(load_manifest(ws), data.val_fraction, data.test_fraction, data.split_seed)
    hospitals = set(manifest["hospital"])
    missing = [h for h in [*data.source_hospitals, data.target_hospital] if h not in hospitals]
    if missing:
        raise ValueError(f"data: hospital(s) {missing} are not in the manifest, which has {sorted(hospitals)}; "
                         "fix data.source_hospitals / data.target_hospital")
    manifest["role"] = np.where(manifest["hospital"].isin(data.source_hospitals), "source",
                                np.where(manifest["hospital"] == data.target_hospital, "target", "external"))
    return manifest


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


def data_hash(rows: pd.DataFrame) -> str:
    """Content hash of the images a stage used (order-independent)."""
    return hashlib.sha256("\n".join(sorted(rows["content_hash"])).encode()).hexdigest()


def _write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(tmp, path)
    return path


def _write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- stages


def run_synth(cfg: SynthConfig, ws: Workspace) -> dict:
    """Write the embedded synthetic multi-hospital cohort to ``ws.dicom``."""
    from medtl.synth import write_cohort

    summary = write_cohort(cfg, ws.dicom)
    log.info("synth: %s", summary)
    return {"summary": str(summary), "out_dir": str(ws.dicom)}


def run_ingest(cfg: IngestConfig, ws: Workspace) -> dict:
    """DICOM folder → de-identified arrays + manifest; prints the accounting line. With ``cfg.pacs`` the
    folder is ``ws.pacs_incoming``, first filled from the PACS (only instances not already there)."""
    from medtl.ingest import ingest_folder

    if cfg.pacs is not None:
        from medtl.ingest.sources import pull

        log.info("ingest: pulled %s", pull(cfg.pacs, ws.pacs_incoming))
        cfg = cfg.model_copy(update={"input_dir": ws.pacs_incoming})
    summary = ingest_folder(cfg, ws)
    log.info("ingest: %s", summary)
    return {"summary": str(summary), "manifest": str(ws.manifest)}


def run_pretrain(cfg: PretrainConfig, data: DataConfig, ws: Workspace) -> dict:
    """Self-supervised pretraining on every non-test image (labels unused); exports ``<arch>.ssl``."""
    manifest = load_split_manifest(ws, data)
    rows = manifest[manifest["split"] != "test"]
    if cfg.hospitals is not None:
        rows = rows[rows["hospital"].isin(cfg.hospitals)]
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
                 fingerprint_extra={"init": init, "method": cfg.method, "data": digest},
                 callbacks=[monitor] if monitor else (), description=f"pretrain {cfg.method}")
    knn_curve = [{"epoch": h["epoch"], "knn_acc": h["knn_acc"]} for h in result.history if "knn_acc" in h]
    card = {
        "method": cfg.method, "init": init, "epochs": cfg.train.epochs,
        "n_images": len(rows), "hospitals": sorted(rows["hospital"].unique()), "data_sha256": digest,
        "seed": cfg.train.seed, "config": cfg.model_dump(mode="json"), "knn_curve": knn_curve,
        "history": result.history,
        "created_at": datetime.now(timezone.utc).isoformat(), "medtl_version": medtl.__version__,
    }
    path = save_backbone(backbone, ws.weights / f"{cfg.arch}.ssl", card)
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


def run_select(cfg: SelectConfig, data: DataConfig, ws: Workspace) -> dict:
    """Score every candidate backbone on the source hospitals' labeled train+val images and rank them."""
    manifest = load_split_manifest(ws, data)
    rows = manifest[(manifest["role"] == "source") & manifest["split"].isin(["train", "val"])]
    y = rows["label"].astype(int).to_numpy()
    features, source_probabilities, skipped = {}, {}, {}
    for name in cfg.candidates:
        try:
            source_classes = get_backbone_cfg(name, ws.weights).pretrained_classes
            backbone = create_backbone(name, num_classes=source_classes, weights_dir=ws.weights)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("select: skipping %s: %s", name, exc)
            skipped[name] = str(exc)
            continue
        features[name], probabilities = embed_with_source_head(backbone, _eval_loader(rows, backbone, data))
        if probabilities is not None:
            source_probabilities[name] = probabilities
    selector = BackboneSelector(rank_by=cfg.rank_by, cv_folds=cfg.cv_folds).fit(
        features, y, rows["patient_id"].to_numpy(), source_probabilities=source_probabilities)
    ranking = [{"backbone": name, **{score: _finite_or_none(row[score]) for score in SCORES},
                "rank": int(row["rank"]), "chosen": name == selector.best_}
               for name, row in selector.scores_.iterrows()]
    seconds = {name: {score: _finite_or_none(row[score]) for score in SCORES}
               for name, row in selector.seconds_.iterrows()}
    payload = {"rank_by": cfg.rank_by, "best": selector.best_, "ranking": ranking, "score_seconds": seconds,
               "not_scored": selector.nan_reasons_, "skipped": skipped, "n_images": len(rows),
               "n_positive": int(y.sum())}
    _write_json(ws.select / "ranking.json", payload)
    log.info("select: %s", ", ".join(f"{r['backbone']} ({cfg.rank_by}={r[cfg.rank_by]:.3f})" for r in ranking))
    return payload


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # JSON has no NaN


def _chosen_backbone(cfg: FinetuneConfig, ws: Workspace) -> str:
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


def run_finetune(cfg: FinetuneConfig, data: DataConfig, ws: Workspace) -> dict:
    """Fine-tune the chosen backbone on the source hospitals with the first layer groups frozen."""
    manifest = load_split_manifest(ws, data)
    name = _chosen_backbone(cfg, ws)
    model = create_backbone(name, num_classes=cfg.num_classes, weights_dir=ws.weights)
    groups, plan = optimizer_groups(model, cfg.train.lr, freeze=cfg.freeze_groups)
    source = manifest[manifest["role"] == "source"]
    train_rows, val_rows = source[source["split"] == "train"], source[source["split"] == "val"]
    val_loader = _eval_loader(val_rows, model, data)
    y_val = val_rows["label"].astype(int).to_numpy()

    def validate(epoch: int, m: torch.nn.Module, logs: dict) -> None:
        prob = positive_probability(m, val_loader)
        logs["val_auc"] = binary_metrics(y_val, prob, n_bootstrap=0)["auc"]["value"]

    result = fit(model, Supervised(), _train_loader(train_rows, model, data, cfg.train.batch_size), cfg.train,
                 checkpoint_dir=ws.finetune / "checkpoints", param_groups=groups, callbacks=[validate],
                 fingerprint_extra={"backbone": name, "freeze": cfg.freeze_groups, "data": data_hash(train_rows)},
                 description="finetune")
    threshold = youden_threshold(y_val, positive_probability(model, val_loader))
    card = {"backbone": name, "arch": model.cfg.arch, "num_classes": cfg.num_classes,
            "freeze_groups": cfg.freeze_groups, **asdict(plan), "epochs": cfg.train.epochs,
            "train_images": len(train_rows), "val_images": len(val_rows), "threshold": threshold,
            "threshold_source": f"Youden index on the source validation split ({len(val_rows)} images)",
            "history": result.history, "seconds": result.seconds}
    _save_model(model, ws.finetune / "model", card)
    _write_parquet(_predict_all(model, evaluation_rows(manifest), data, "finetuned"), ws.finetune / "predictions.parquet")
    log.info("finetune: %s, %d/%d parameters trained, val AUC %.3f", name, plan.trainable_params,
             plan.total_params, result.history[-1].get("val_auc", float("nan")))
    return {k: v for k, v in card.items() if k != "history"}


def _save_model(model: Backbone, stem: Path, card: dict) -> None:
    atomic_save_tensors(model.state_dict(), stem.with_suffix(".safetensors"), {"medtl_card": json.dumps(card)})
    _write_json(stem.with_suffix(".json"), card)


def load_finetuned(ws: Workspace) -> tuple[Backbone, dict]:
    """The fine-tuned model and its card, from ``ws.finetune``."""
    stem = ws.finetune / "model"
    if not stem.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"{stem}.safetensors not found: run `medtl finetune` first")
    card = json.loads(stem.with_suffix(".json").read_text())
    model = create_backbone(card["backbone"], num_classes=card["num_classes"], weights_dir=ws.weights)
    model.load_state_dict(load_file(str(stem.with_suffix(".safetensors"))))
    return model.eval(), card


def run_adapt(cfg: AdaptConfig, data: DataConfig, ws: Workspace) -> dict:
    """Adapt the fine-tuned model to the target hospital's unlabeled images; every method gets the same
    budget, and ``source_only`` is the same training with the zero plugin."""
    manifest = load_split_manifest(ws, data)
    base, card = load_finetuned(ws)
    source = manifest[(manifest["role"] == "source") & (manifest["split"] == "train")]
    target = manifest[(manifest["role"] == "target") & (manifest["split"] == "unlabeled")]
    if len(target) == 0:
        raise ValueError(f"hospital {data.target_hospital!r} has no unlabeled images to adapt on")
    eval_rows = evaluation_rows(manifest)
    predictions, summary = [], {}
    for method in cfg.methods:
        model = copy.deepcopy(base)
        if method == "adabn":
            n_bn = recompute_batchnorm_statistics(
                model, (b["image"] for b in _eval_loader(target, model, data)))
            summary[method] = {"batchnorm_layers": n_bn, "target_images": len(target)}
        elif method == "tent":
            # target images only, un-augmented as at test time; BatchNorm affine parameters are all that train
            params = tent_parameters(model, track_target_statistics=True)
            t = eval_transform(data.spatial_dims, data.image_size, model.cfg.mean, model.cfg.std)
            loader = make_loader(_dataset(target, t), cfg.train.batch_size, shuffle=True,
                                 num_workers=data.num_workers, drop_last=len(target) > cfg.train.batch_size)
            result = fit(model, EntropyMinimisation(), loader, cfg.train, param_groups=[{"params": params}],
                         checkpoint_dir=ws.adapt / "checkpoints" / method,
                         fingerprint_extra={"method": method, "base": card["backbone"]}, description="adapt tent")
            summary[method] = {"history": result.history, "seconds": result.seconds,
                               "trained_parameters": sum(p.numel() for p in params)}
        else:
            plugin = build_adaptation_loss(method, model.num_features)
            if plugin.uses_strong_view:
                t = weak_strong_transform(data.spatial_dims, data.image_size, model.cfg.mean, model.cfg.std,
                                          data.augment)
                target_loader = make_loader(_dataset(target, t), cfg.train.batch_size, shuffle=True,
                                            num_workers=data.num_workers, drop_last=True)
            else:
                target_loader = _train_loader(target, model, data, cfg.train.batch_size)
            loader = PairedLoader(_train_loader(source, model, data, cfg.train.batch_size), target_loader)
            result = fit(model, TaskWithAdaptation(plugin, reg=cfg.reg), loader, cfg.train,
                         checkpoint_dir=ws.adapt / "checkpoints" / method,
                         fingerprint_extra={"method": method, "base": card["backbone"], "reg": cfg.reg},
                         description=f"adapt {method}")
            summary[method] = {"history": result.history, "seconds": result.seconds}
        atomic_save_tensors(model.state_dict(), ws.adapt / f"{method}.safetensors", {"method": method})
        predictions.append(_predict_all(model, eval_rows, data, method))
    frame = pd.concat(predictions, ignore_index=True)
    _write_parquet(frame, ws.adapt / "predictions.parquet")
    target_auc = {m: binary_metrics(g["label"].to_numpy(), g["prob"].to_numpy(), n_bootstrap=0)["auc"]["value"]
                  for m, g in frame[frame["role"] == "target"].groupby("model")}
    _write_json(ws.adapt / "summary.json", {"target_hospital": data.target_hospital, "methods": cfg.methods,
                                            "reg": cfg.reg, "target_auc": target_auc, "details": summary})
    log.info("adapt: target AUC %s", ", ".join(f"{m}={a:.3f}" for m, a in target_auc.items()))
    return {"target_hospital": data.target_hospital, "target_auc": target_auc}


def run_report(config: PipelineConfig, ws: Workspace) -> dict:
    """Per-hospital validation report (HTML + JSON) from the fine-tune and adapt stages' predictions."""
    from medtl.evaluate.report import build_report

    data = config.data
    manifest = load_split_manifest(ws, data)
    parts = [p for p in (ws.finetune / "predictions.parquet", ws.adapt / "predictions.parquet") if p.exists()]
    if not parts:
        raise FileNotFoundError(f"no predictions in {ws.finetune} or {ws.adapt}: run finetune (and adapt) first")
    predictions = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    card = json.loads((ws.finetune / "model.json").read_text())
    ranking = json.loads((ws.select / "ranking.json").read_text()) if (ws.select / "ranking.json").exists() else {}
    context = {
        "title": config.report.title,
        "primary_model": "finetuned",
        "threshold": card["threshold"],
        "threshold_source": card["threshold_source"],
        "cohort": _cohort_table(manifest),
        "ingest": _ingest_accounting(ws),
        "backbone_ranking": ranking.get("ranking", []),
        "finetune": {k: v for k, v in card.items() if k not in ("history", "threshold_source")},
        "adaptation": {"target_hospital": data.target_hospital,
                       "methods": [m for m in config.adapt.methods if m in set(predictions["model"])],
                       "notes": f"Every trained method continues from the fine-tuned model for "
                                f"{config.adapt.train.epochs} epochs on source labels plus unlabeled "
                                f"{data.target_hospital} images (reg={config.adapt.reg}); source_only uses the "
                                "zero plugin with the same budget; AdaBN only re-estimates BatchNorm statistics."},
        "limitations": _limitations(config, manifest),
        "provenance": {"medtl_version": medtl.__version__,
                       "config_sha256": hashlib.sha256(config.model_dump_json().encode()).hexdigest(),
                       "data_sha256": data_hash(manifest), "created_at": datetime.now(timezone.utc).isoformat()},
    }
    result = build_report(predictions, context, config.report, ws.report)
    log.info("report: %s", result.html_path)
    return {"html": str(result.html_path), "json": str(result.json_path), "summary_markdown": result.summary_markdown}


def _cohort_table(manifest: pd.DataFrame) -> list[dict]:
    rows = []
    for hospital, g in manifest.groupby("hospital", sort=True):
        labeled = g[g["label"].notna()]
        rows.append({"hospital": hospital, "role": g["role"].iloc[0], "vendor": g["vendor"].iloc[0],
                     "model": g["model"].iloc[0], "n_images": len(g), "n_patients": g["patient_id"].nunique(),
                     "n_labeled": len(labeled),
                     "prevalence": float(labeled["label"].astype(float).mean()) if len(labeled) else None})
    return rows


def _ingest_accounting(ws: Workspace) -> dict:
    from medtl.ingest import load_ledger

    ledger = load_ledger(ws)
    counts = ledger["status"].value_counts()
    quarantined = ledger[ledger["status"] == "quarantined"]
    return {"files_in": len(ledger), "ingested": int(counts.get("ingested", 0)),
            "quarantined": int(counts.get("quarantined", 0)), "duplicates": int(counts.get("duplicate", 0)),
            "quarantine_reasons": quarantined["reason"].str.split(":").str[0].value_counts().to_dict()}


def _limitations(config: PipelineConfig, manifest: pd.DataFrame) -> list[str]:
    notes = ["Operating threshold chosen on the source validation split; sensitivity/specificity at other "
             "hospitals show how well it transfers, not a re-tuned operating point.",
             "Confidence intervals are patient-level bootstrap percentile intervals "
             f"({config.report.n_bootstrap} resamples); small hospitals give wide intervals."]
    if config.ingest.uses_synthetic_cohort:
        notes.insert(0, "Data are the embedded SYNTHETIC cohort (medtl synth): these figures validate the "
                        "pipeline, not a clinical model.")
    return notes


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in order, without Prefect (the Prefect flow in ``flows/pipeline.py`` does the same)."""
    ws = Workspace(config.workdir)
    if config.ingest.uses_synthetic_cohort:
        run_synth(config.synth, ws)
    run_ingest(config.ingest, ws)
    if f"{config.pretrain.arch}.ssl" in config.select.candidates:
        run_pretrain(config.pretrain, config.data, ws)
    run_select(config.select, config.data, ws)
    run_finetune(config.finetune, config.data, ws)
    run_adapt(config.adapt, config.data, ws)
    return run_report(config, ws)
