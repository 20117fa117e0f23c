"""Per-hospital clinical validation report: one self-contained HTML page for reviewers, a JSON twin
for machines, and a short markdown summary for the orchestrator to publish.

Every number in the report comes from :mod:`medtl.evaluate.metrics` (patient-level bootstrap CIs).
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global
backend state) and embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from medtl.config import ReportConfig
from medtl.evaluate.metrics import METRIC_NAMES, auc_difference, binary_metrics, calibration_curve

PREDICTION_COLUMNS: tuple[str, ...] = ("model", "hospital", "role", "patient_id", "label", "prob")
ROLES: tuple[str, ...] = ("source", "target", "external")
BASELINE_MODEL = "source_only"

REQUIRED_CONTEXT: dict[str, type | tuple[type, ...]] = {
    "title": str,
    "primary_model": str,
    "threshold": (int, float),
    "threshold_source": str,
    "cohort": list,
    "ingest": dict,
    "backbone_ranking": list,
    "finetune": dict,
    "adaptation": dict,
    "limitations": list,
}
COHORT_KEYS = ("hospital", "role", "vendor", "model", "n_images", "n_patients", "n_labeled", "prevalence")
INGEST_KEYS = ("files_in", "ingested", "quarantined", "duplicates")
RANKING_KEYS = ("backbone", "logme", "linear_probe_auc", "rank", "chosen")
ADAPTATION_KEYS = ("target_hospital", "methods")

# Review flags, not gates: the report states them, a human decides.
MIN_AUC_CI_LOW = 0.7      # lower CI bound below this = discrimination not demonstrated at that site
MAX_ECE = 0.10            # average probability error above 10 points = probabilities need recalibration
MIN_PER_CLASS = 10        # fewer positives or negatives than this = CIs too wide to support a claim

_BOOTSTRAP_SEED = 0       # fixed so that re-rendering a report reproduces its numbers exactly
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")  # Okabe-Ito
_METRIC_LABELS = {"auc": "AUC", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
                  "specificity": "Specificity", "ece": "ECE"}
_COLUMN_TITLES = {"rank": "Rank", "backbone": "Backbone", "logme": "LogME", "linear_probe_auc": "Linear-probe AUC",
                  "h_score": "H-score", "knn_accuracy": "k-NN accuracy", "leep": "LEEP", "nce": "NCE"}
_ROLE_HELP = {
    "source": "training hospital, evaluated on held-out patients",
    "target": "adapted to without its labels",
    "external": "never seen in training or adaptation",
}
_TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote and computed.

    Attributes:
        html_path: the self-contained HTML report.
        json_path: its JSON twin (same content as ``metrics``).
        summary_markdown: headline tables in markdown, for a Prefect markdown artifact.
        metrics: every computed metric with CIs plus the context, JSON-ready (NaN stored as None).
    """

    html_path: Path
    json_path: Path
    summary_markdown: str
    metrics: dict


def build_report(predictions: pd.DataFrame, context: dict, cfg: ReportConfig, out_dir: Path) -> ReportResult:
    """Compute per-hospital and adaptation metrics and write ``report.html`` and ``report.json``.

    Args:
        predictions: one row per evaluated image with columns ``model`` (e.g. "source_only"),
            ``hospital``, ``role`` ("source" / "target" / "external"), ``patient_id``, ``label`` (0/1)
            and ``prob`` (predicted P(label = 1)).
        context: run facts shown in the report; required keys are :data:`REQUIRED_CONTEXT`
            (``cohort`` entries need :data:`COHORT_KEYS`, ``ingest`` needs :data:`INGEST_KEYS`,
            ``backbone_ranking`` entries need :data:`RANKING_KEYS`, ``adaptation`` needs
            :data:`ADAPTATION_KEYS`); optional: ``provenance`` (dict), ``adaptation.notes``,
            ``ingest.quarantine_reasons`` (reason -> count).
        cfg: bootstrap size, confidence level and calibration bins (the title shown is
            ``context['title']``, typically set from ``cfg.title``).
        out_dir: folder to write into (created when missing); existing reports are replaced atomically.

    Returns:
        :class:`ReportResult` with both paths, the markdown summary and the metrics dict.

    Raises:
        ValueError: naming the missing / malformed context key or prediction column.
    """
    ctx = _validate_context(context)
    preds = _validate_predictions(predictions, ctx)
    metrics = _compute(preds, ctx, cfg)
    figures = _figures(preds, metrics, cfg)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / "report.html", out_dir / "report.json"
    payload = _jsonable({**metrics, "context": ctx})
    html = _render_html(metrics, ctx, figures)  # render before writing either file: both or neither
    _write_atomic(json_path, json.dumps(payload, indent=2, allow_nan=False))
    _write_atomic(html_path, html)
    return ReportResult(html_path=html_path, json_path=json_path,
                        summary_markdown=_summary_markdown(metrics), metrics=payload)


# ---------------------------------------------------------------------------------------------
# validation

def _validate_context(context: dict) -> dict:
    if not isinstance(context, dict):
        raise ValueError(f"context must be a dict, got {type(context).__name__}")
    for key, kind in REQUIRED_CONTEXT.items():
        if key not in context:
            raise ValueError(f"context is missing required key {key!r}; required keys: {', '.join(REQUIRED_CONTEXT)}")
        value = context[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"context[{key!r}] must be {names}, got {type(value).__name__}")
    if not math.isfinite(context["threshold"]):
        raise ValueError("context['threshold'] must be a finite number (the source-validation operating point)")
    for i, row in enumerate(context["cohort"]):
        _require_keys(row, COHORT_KEYS, f"context['cohort'][{i}]")
    _require_keys(context["ingest"], INGEST_KEYS, "context['ingest']")
    for key in INGEST_KEYS:
        count = context["ingest"][key]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"context['ingest'][{key!r}] must be a non-negative file count, got {count!r}")
    for i, row in enumerate(context["backbone_ranking"]):
        _require_keys(row, RANKING_KEYS, f"context['backbone_ranking'][{i}]")
        if not isinstance(row["rank"], int) or isinstance(row["rank"], bool):
            raise ValueError(f"context['backbone_ranking'][{i}]['rank'] must be an integer (1 = best), "
                             f"got {row['rank']!r}")
    _require_keys(context["adaptation"], ADAPTATION_KEYS, "context['adaptation']")
    methods = context["adaptation"]["methods"]
    if not isinstance(methods, list) or not methods:
        raise ValueError("context['adaptation']['methods'] must be a non-empty list of model names")
    if "provenance" in context and not isinstance(context["provenance"], dict):
        raise ValueError("context['provenance'] must be a dict (e.g. config hash, medtl version, created_at)")
    return context


def _require_keys(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict with keys {', '.join(keys)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where} is missing required key {missing[0]!r} (needs {', '.join(keys)})")


def _validate_predictions(predictions: pd.DataFrame, ctx: dict) -> pd.DataFrame:
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions is missing column {missing[0]!r} (needs {', '.join(PREDICTION_COLUMNS)})")
    preds = predictions.loc[:, list(PREDICTION_COLUMNS)].copy()
    if preds["label"].isna().any():
        raise ValueError("predictions['label'] has missing values; drop unlabeled images before the report")
    if preds["prob"].isna().any():
        raise ValueError("predictions['prob'] has missing values; every evaluated image needs a probability")
    # Plain str / int / float columns: categoricals and nullable dtypes would leak unused categories
    # into groupby and pd.NA into numpy.
    for column in ("model", "hospital", "role"):
        preds[column] = preds[column].astype(str)
    preds["label"] = preds["label"].astype("int64")
    preds["prob"] = preds["prob"].astype("float64")
    bad_roles = sorted(set(preds["role"]) - set(ROLES))
    if bad_roles:
        raise ValueError(f"predictions['role'] has unknown values {bad_roles}; use one of {', '.join(ROLES)}")
    roles_per_site = preds.groupby("hospital")["role"].nunique()
    if (roles_per_site > 1).any():
        raise ValueError(f"hospital {roles_per_site[roles_per_site > 1].index[0]!r} has more than one role in "
                         "predictions; each hospital must be source, target or external, not several")
    site_role = preds.groupby("hospital")["role"].first().to_dict()
    for row in ctx["cohort"]:
        if row["hospital"] in site_role and row["role"] != site_role[row["hospital"]]:
            raise ValueError(f"hospital {row['hospital']!r} is {row['role']!r} in context['cohort'] but "
                             f"{site_role[row['hospital']]!r} in predictions; make the two agree")

    primary, target = ctx["primary_model"], ctx["adaptation"]["target_hospital"]
    if not (preds["model"] == primary).any():
        raise ValueError(f"context['primary_model'] is {primary!r} but predictions has no rows for it "
                         f"(models present: {sorted(preds['model'].unique())})")
    if target not in site_role:
        raise ValueError(f"context['adaptation']['target_hospital'] is {target!r} but predictions has no rows "
                         f"for it (hospitals present: {sorted(site_role)})")
    on_target = set(preds.loc[preds["hospital"] == target, "model"])
    for method in ctx["adaptation"]["methods"]:
        if method not in on_target:
            raise ValueError(f"context['adaptation']['methods'] lists {method!r} but predictions has no rows for "
                             f"it on {target!r}; add its predictions or drop it from the list")
    return preds


# ---------------------------------------------------------------------------------------------
# metrics

def _hospital_order(preds: pd.DataFrame, ctx: dict) -> list[str]:
    """Cohort order when given, else source → target → external, then by name."""
    cohort_pos = {row["hospital"]: i for i, row in enumerate(ctx["cohort"])}
    site_role = preds.groupby("hospital")["role"].first()
    return sorted(site_role.index, key=lambda h: (cohort_pos.get(h, len(cohort_pos)), ROLES.index(site_role[h]), h))


def _evaluate(rows: pd.DataFrame, threshold: float, cfg: ReportConfig) -> dict:
    result = binary_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), threshold=threshold,
                            groups=rows["patient_id"].to_numpy(), n_bootstrap=cfg.n_bootstrap,
                            confidence=cfg.confidence, n_bins=cfg.calibration_bins, seed=_BOOTSTRAP_SEED)
    curve = calibration_curve(rows["label"].to_numpy(), rows["prob"].to_numpy(), cfg.calibration_bins)
    result["calibration"] = {"mean_predicted": curve.mean_predicted, "observed_frequency": curve.observed_frequency,
                             "counts": curve.counts, "bin_edges": curve.bin_edges}
    return result


def _compute(preds: pd.DataFrame, ctx: dict, cfg: ReportConfig) -> dict:
    threshold = float(ctx["threshold"])
    primary = ctx["primary_model"]
    target = ctx["adaptation"]["target_hospital"]
    site_role = preds.groupby("hospital")["role"].first().to_dict()

    per_hospital: dict[str, dict] = {}
    for hospital in _hospital_order(preds, ctx):
        rows = preds[(preds["model"] == primary) & (preds["hospital"] == hospital)]
        if len(rows):
            per_hospital[hospital] = {"role": site_role[hospital], **_evaluate(rows, threshold, cfg)}

    on_target = preds[preds["hospital"] == target]
    baseline = on_target[on_target["model"] == BASELINE_MODEL]
    methods: dict[str, dict] = {}
    for method in ctx["adaptation"]["methods"]:
        rows = on_target[on_target["model"] == method]
        entry = _evaluate(rows, threshold, cfg)
        if len(baseline) and method != BASELINE_MODEL:
            entry["delta_auc_vs_baseline"] = auc_difference(
                rows["label"].to_numpy(), rows["prob"].to_numpy(),
                baseline["label"].to_numpy(), baseline["prob"].to_numpy(),
                groups_a=rows["patient_id"].to_numpy(), groups_b=baseline["patient_id"].to_numpy(),
                n_bootstrap=cfg.n_bootstrap, confidence=cfg.confidence, seed=_BOOTSTRAP_SEED)
        methods[method] = entry

    adapted = {m: e["auc"]["value"] for m, e in methods.items()
               if m != BASELINE_MODEL and not math.isnan(e["auc"]["value"])}
    best = max(adapted, key=adapted.get) if adapted else None
    if BASELINE_MODEL in methods:
        baseline_auc = methods[BASELINE_MODEL]["auc"]
    elif len(baseline):
        baseline_auc = _evaluate(baseline, threshold, cfg)["auc"]
    else:
        baseline_auc = None

    metrics = {
        "schema_version": 1,
        "title": ctx["title"],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"threshold": threshold, "threshold_source": ctx["threshold_source"],
                     "n_bootstrap": cfg.n_bootstrap, "confidence": cfg.confidence,
                     "calibration_bins": cfg.calibration_bins, "bootstrap_unit": "patient",
                     "bootstrap_seed": _BOOTSTRAP_SEED},
        "primary_model": primary,
        "per_hospital": per_hospital,
        "adaptation": {"target_hospital": target, "baseline_model": BASELINE_MODEL,
                       "baseline_auc": baseline_auc, "best_method": best, "methods": methods},
    }
    metrics["warnings"] = _warnings(metrics, ctx)
    return metrics


def _warnings(metrics: dict, ctx: dict) -> list[str]:
    level = _pct(metrics["settings"]["confidence"])
    out: list[str] = []
    for hospital, m in metrics["per_hospital"].items():
        where = f"{hospital} ({m['role']})"
        auc = m["auc"]
        if math.isnan(auc["value"]):
            out.append(f"{where}: AUC undefined — only one class among the labeled images.")
        elif not math.isnan(auc["ci_low"]) and auc["ci_low"] < MIN_AUC_CI_LOW:
            out.append(f"{where}: lower {level} CI bound of AUC is {auc['ci_low']:.3f} < {MIN_AUC_CI_LOW:.2f}; "
                       "adequate discrimination is not demonstrated at this site.")
        if not math.isnan(m["ece"]["value"]) and m["ece"]["value"] > MAX_ECE:
            out.append(f"{where}: ECE {m['ece']['value']:.3f} > {MAX_ECE:.2f}; predicted probabilities are "
                       "miscalibrated here and should not be read as risks without recalibration.")
        if min(m["n_positive"], m["n"] - m["n_positive"]) < MIN_PER_CLASS:
            out.append(f"{where}: fewer than {MIN_PER_CLASS} positive or negative images "
                       f"({m['n_positive']} of {m['n']} positive); confidence intervals are wide.")

    adapt = metrics["adaptation"]
    best, baseline_auc = adapt["best_method"], adapt["baseline_auc"]
    if best is not None and baseline_auc is not None:
        delta = adapt["methods"][best].get("delta_auc_vs_baseline")
        if delta is not None and delta["value"] <= 0:
            out.append(f"Adaptation did not beat {BASELINE_MODEL} on {adapt['target_hospital']}: best method "
                       f"{best} changes AUC by {delta['value']:+.3f}.")
        elif delta is not None and not math.isnan(delta["ci_low"]) and delta["ci_low"] <= 0:
            out.append(f"The AUC gain of {best} over {BASELINE_MODEL} on {adapt['target_hospital']} "
                       f"({delta['value']:+.3f}) is within bootstrap noise ({level} CI includes 0).")

    ingest = ctx["ingest"]
    accounted = ingest["ingested"] + ingest["quarantined"] + ingest["duplicates"]
    if accounted != ingest["files_in"]:
        out.append(f"Ingestion does not balance: {ingest['files_in']} files in, but ingested + quarantined + "
                   f"duplicates = {accounted}.")
    return out


# ---------------------------------------------------------------------------------------------
# figures

def _figures(preds: pd.DataFrame, metrics: dict, cfg: ReportConfig) -> dict[str, str]:
    primary = metrics["primary_model"]
    target = metrics["adaptation"]["target_hospital"]
    threshold = metrics["settings"]["threshold"]
    hospital_curves = [(f"{h} ({m['role']})", preds[(preds["model"] == primary) & (preds["hospital"] == h)], m)
                       for h, m in metrics["per_hospital"].items()]
    method_curves = [(method, preds[(preds["model"] == method) & (preds["hospital"] == target)], m)
                     for method, m in metrics["adaptation"]["methods"].items()]
    return {
        "roc_hospitals": _roc_figure(hospital_curves, threshold, f"ROC of {primary} per hospital"),
        "calibration": _calibration_figure(hospital_curves, cfg.calibration_bins),
        "roc_adaptation": _roc_figure(method_curves, threshold, f"ROC on {target} (target) per method"),
    }


def _roc_figure(curves: list[tuple[str, pd.DataFrame, dict]], threshold: float, title: str) -> str:
    fig = Figure(figsize=(6.2, 5.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#9aa5b1", label="chance")
    for i, (name, rows, m) in enumerate(curves):
        color = _COLORS[i % len(_COLORS)]
        if math.isnan(m["auc"]["value"]):
            ax.plot([], [], color=color, label=f"{name}: AUC n/a (one class)")
            continue
        fpr, tpr, _ = roc_curve(rows["label"].to_numpy(), rows["prob"].to_numpy())
        ax.plot(fpr, tpr, color=color, lw=2, label=f"{name}: AUC {_fmt_ci(m['auc'])}")
        ax.plot(1 - m["specificity"]["value"], m["sensitivity"]["value"], "o", color=color, ms=7,
                mec="white", mew=1.5)
    ax.plot([], [], "o", color="#52606d", mec="white", label=f"operating point (threshold {threshold:.3f})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
           xlabel="1 − specificity (false-positive rate)", ylabel="Sensitivity (true-positive rate)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    return _to_data_uri(fig)


def _calibration_figure(curves: list[tuple[str, pd.DataFrame, dict]], n_bins: int) -> str:
    n = len(curves)
    fig = Figure(figsize=(3.4 * n + 0.4, 4.6))
    grid = fig.add_gridspec(2, n, height_ratios=(3, 1), hspace=0.08, wspace=0.25)
    edges = np.linspace(0, 1, n_bins + 1)
    for i, (name, rows, m) in enumerate(curves):
        color = _COLORS[i % len(_COLORS)]
        top = fig.add_subplot(grid[0, i])
        bottom = fig.add_subplot(grid[1, i], sharex=top)
        cal = m["calibration"]
        filled = cal["counts"] > 0
        top.plot([0, 1], [0, 1], ls="--", lw=1, color="#9aa5b1")
        top.plot(cal["mean_predicted"][filled], cal["observed_frequency"][filled], "o-", color=color, lw=2, ms=5)
        top.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=f"{name}\nECE {_fmt_ci(m['ece'])}")
        top.title.set_fontsize(9)
        top.tick_params(labelbottom=False)
        top.grid(alpha=0.3)
        probs, labels = rows["prob"].to_numpy(), rows["label"].to_numpy()
        bottom.hist([probs[labels == 0], probs[labels == 1]], bins=edges, stacked=True,
                    color=["#bcccdc", color], label=["label 0", "label 1"])
        bottom.set_xlabel("Predicted probability")
        if i == 0:
            top.set_ylabel("Observed frequency")
            bottom.set_ylabel("Images")
            bottom.legend(fontsize=7, frameon=False)
    return _to_data_uri(fig)


def _to_data_uri(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# rendering

def _ci_parts(m: dict, signed: bool = False) -> tuple[str, str]:
    """``("0.912", "[0.871–0.947]")``; ``("n/a", "")`` for an undefined value."""
    if math.isnan(m["value"]):
        return "n/a", ""
    spec = "+.3f" if signed else ".3f"
    value = format(m["value"], spec)
    if math.isnan(m["ci_low"]) or math.isnan(m["ci_high"]):
        return value, "[CI n/a]"
    sep = " to " if signed else "–"  # an en dash between signed numbers would read as a minus
    return value, f"[{format(m['ci_low'], spec)}{sep}{format(m['ci_high'], spec)}]"


def _fmt_ci(m: dict, signed: bool = False) -> str:
    """``0.912 [0.871–0.947]``."""
    return " ".join(part for part in _ci_parts(m, signed) if part)


def _fmt_delta(m: dict | None) -> str:
    return "—" if m is None else _fmt_ci(m, signed=True)


def _fmt_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if value == 0 or 0.01 <= abs(value) < 1000:
            return f"{value:.3f}"
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.2g}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_value(v) for v in value)
    return str(value)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _metric_cells(m: dict) -> dict[str, dict[str, str]]:
    """Value and interval kept apart so the table can stack them."""
    return {name: dict(zip(("value", "ci"), _ci_parts(m[name]))) for name in METRIC_NAMES}


def _delta_cell(name: str, m: dict) -> dict[str, str]:
    if name == BASELINE_MODEL:
        return {"value": "reference", "ci": ""}
    delta = m.get("delta_auc_vs_baseline")
    if delta is None:
        return {"value": "—", "ci": ""}
    return dict(zip(("value", "ci"), _ci_parts(delta, signed=True)))


def _render_html(metrics: dict, ctx: dict, figures: dict[str, str]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    adapt = metrics["adaptation"]
    ingest = ctx["ingest"]
    ranking_columns = list(dict.fromkeys(["rank", "backbone", "logme", "linear_probe_auc",
                                          *(k for row in ctx["backbone_ranking"] for k in row if k != "chosen")]))
    view = {
        "title": ctx["title"],
        "generated_at": datetime.fromisoformat(metrics["generated_at"]).strftime("%Y-%m-%d %H:%M UTC"),
        "primary_model": metrics["primary_model"],
        "threshold": f"{metrics['settings']['threshold']:.3f}",
        "threshold_source": ctx["threshold_source"],
        "level": _pct(metrics["settings"]["confidence"]),
        "n_bootstrap": metrics["settings"]["n_bootstrap"],
        "calibration_bins": metrics["settings"]["calibration_bins"],
        "summary": _plain_summary(metrics),
        "headline": _headline(metrics),
        "warnings": metrics["warnings"],
        "cohort": [{**row, **{k: _fmt_value(row[k]) for k in ("n_images", "n_patients", "n_labeled")},
                    "prevalence": "—" if row["prevalence"] is None else f"{row['prevalence'] * 100:.1f} %"}
                   for row in ctx["cohort"]],
        "ingest": {k: _fmt_value(ingest[k]) for k in INGEST_KEYS},
        "ingest_balances": ingest["ingested"] + ingest["quarantined"] + ingest["duplicates"] == ingest["files_in"],
        "quarantine_reasons": sorted((ingest.get("quarantine_reasons") or {}).items(), key=lambda kv: -kv[1]),
        "ranking_columns": [_COLUMN_TITLES.get(c, c.replace("_", " ").capitalize()) for c in ranking_columns],
        "ranking": [{"cells": [_fmt_value(row.get(c)) for c in ranking_columns], "chosen": bool(row["chosen"])}
                    for row in sorted(ctx["backbone_ranking"], key=lambda r: r["rank"])],
        "roles": _ROLE_HELP,
        "hospitals": [{"hospital": h, "role": m["role"], "n": m["n"], "n_patients": m["n_patients"],
                       "n_positive": m["n_positive"], **_metric_cells(m)}
                      for h, m in metrics["per_hospital"].items()],
        "target": adapt["target_hospital"],
        "baseline_model": BASELINE_MODEL,
        "methods": [{"method": name, "n": m["n"], "n_patients": m["n_patients"], **_metric_cells(m),
                     "delta": _delta_cell(name, m),
                     "best": name == adapt["best_method"]}
                    for name, m in adapt["methods"].items()],
        "adaptation_notes": _as_list(ctx["adaptation"].get("notes")),
        "checks": {"min_auc_ci_low": f"{MIN_AUC_CI_LOW:.2f}", "max_ece": f"{MAX_ECE:.2f}",
                   "min_per_class": MIN_PER_CLASS},
        "metric_notes": _metric_notes(metrics),
        "finetune": [(k, _fmt_value(v)) for k, v in ctx["finetune"].items()],
        "limitations": ctx["limitations"],
        "provenance": [(k, _fmt_value(v)) for k, v in (ctx.get("provenance") or {}).items()],
        "fig": figures,
    }
    return env.get_template("report.html").render(**view)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _metric_notes(metrics: dict) -> list[str]:
    adapt = metrics["adaptation"]
    scopes = [(f"{metrics['primary_model']} on {h}", m) for h, m in metrics["per_hospital"].items()]
    scopes += [(f"{name} on {adapt['target_hospital']}", m) for name, m in adapt["methods"].items()]
    return [f"{scope}: {note}" for scope, m in scopes for note in m["notes"]]


def _best_line(adapt: dict) -> tuple[str, dict] | None:
    best = adapt["best_method"]
    return (best, adapt["methods"][best]) if best is not None else None


def _plain_summary(metrics: dict) -> list[str]:
    level = _pct(metrics["settings"]["confidence"])
    per = metrics["per_hospital"]
    adapt = metrics["adaptation"]
    roles = {r: [h for h, m in per.items() if m["role"] == r] for r in ROLES}
    n_patients = sum(m["n_patients"] for m in per.values())
    paragraphs = [
        f"This report checks how well the model “{metrics['primary_model']}” detects the finding on "
        f"{n_patients:,} patients from {len(per)} hospital{'s' if len(per) != 1 else ''}: "
        + "; ".join(f"{', '.join(hs)} ({role})" for role, hs in roles.items() if hs) + ". "
        f"Every number carries a {level} confidence interval from resampling patients.",
    ]
    site_lines = [f"{h} ({m['role']}) AUC {_fmt_ci(m['auc'])}" for h, m in per.items()]
    paragraphs.append("Discrimination (AUC; 0.5 = chance, 1.0 = perfect): " + ", ".join(site_lines) + ".")
    best = _best_line(adapt)
    if adapt["baseline_auc"] is not None and best is not None:
        paragraphs.append(
            f"On the target hospital {adapt['target_hospital']}, AUC was {_fmt_ci(adapt['baseline_auc'])} "
            f"without adaptation ({BASELINE_MODEL}) and {_fmt_ci(best[1]['auc'])} after the best adaptation "
            f"method ({best[0]}); difference {_fmt_delta(best[1].get('delta_auc_vs_baseline'))}.")
    paragraphs.append(
        f"Sensitivity and specificity are given at one fixed threshold, {metrics['settings']['threshold']:.3f}, "
        f"chosen on {metrics['settings']['threshold_source']} and applied unchanged to every hospital; it was "
        "not tuned on target or external data.")
    return paragraphs


def _headline(metrics: dict) -> list[dict[str, str]]:
    cards = [{"label": f"AUC · {h}", "sub": m["role"], "value": _fmt_value(m["auc"]["value"]),
              "ci": _ci_parts(m["auc"])[1] or "n/a"} for h, m in metrics["per_hospital"].items()]
    best = _best_line(metrics["adaptation"])
    if best is not None:
        cards.append({"label": f"AUC · {metrics['adaptation']['target_hospital']}",
                      "sub": f"after {best[0]}", "value": _fmt_value(best[1]["auc"]["value"]),
                      "ci": _ci_parts(best[1]["auc"])[1] or "n/a"})
    return cards


def _md(text: Any) -> str:
    """Escape the one character that breaks a markdown table cell."""
    return str(text).replace("|", "\\|")


def _summary_markdown(metrics: dict) -> str:
    level = _pct(metrics["settings"]["confidence"])
    adapt = metrics["adaptation"]
    lines = [
        f"## {_md(metrics['title'])}",
        "",
        f"Primary model **{_md(metrics['primary_model'])}**; threshold {metrics['settings']['threshold']:.3f} "
        f"(chosen on {_md(metrics['settings']['threshold_source'])}); {level} patient-bootstrap CIs.",
        "",
        "| Hospital | Role | Images (patients) | AUC | Sensitivity | Specificity | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for h, m in metrics["per_hospital"].items():
        lines.append(f"| {_md(h)} | {m['role']} | {m['n']} ({m['n_patients']}) | {_fmt_ci(m['auc'])} | "
                     f"{_fmt_ci(m['sensitivity'])} | {_fmt_ci(m['specificity'])} | {_fmt_ci(m['ece'])} |")
    lines += ["", f"**Adaptation on {_md(adapt['target_hospital'])}**", "",
              f"| Method | AUC | ΔAUC vs {BASELINE_MODEL} |", "|---|---|---|"]
    for name, m in adapt["methods"].items():
        delta = "reference" if name == BASELINE_MODEL else _fmt_delta(m.get("delta_auc_vs_baseline"))
        marker = " (best)" if name == adapt["best_method"] else ""
        lines.append(f"| {_md(name)}{marker} | {_fmt_ci(m['auc'])} | {delta} |")
    if metrics["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {_md(w)}" for w in metrics["warnings"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# output

def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN / inf → None; values JSON cannot hold are stored as their string."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    return str(obj)


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a half-written report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
