"""Prefect artifacts of a run: metric tables built from the stage results and the workspace's JSON files.

The builders are plain functions (dicts in, rows out) so that they can be checked without a Prefect server;
:func:`publish_table` hands their rows to ``create_table_artifact`` under a fixed key, so that every run of a
deployment adds a version to the same artifact and the UI shows how the numbers moved.
"""

from __future__ import annotations

import math
from typing import Any

from prefect.artifacts import create_table_artifact

SELECT_KEY = "medtl-select-ranking"
FINETUNE_KEY = "medtl-finetune-history"
ADAPT_KEY = "medtl-adaptation-comparison"
SITES_KEY = "medtl-per-site-metrics"
LOHO_KEY = "medtl-leave-one-hospital-out"

_DIGITS = 4


def _number(value: Any) -> float | int | None:
    """Rounded number, None for missing / NaN (JSON has no NaN, and a table cell should read as empty)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return round(value, _DIGITS) if math.isfinite(value) else None


def _estimate(metric: dict | None) -> dict[str, float | None]:
    """``{"value", "ci_low", "ci_high"}`` of a report metric, rounded (None when missing)."""
    metric = metric or {}
    return {part: _number(metric.get(part)) for part in ("value", "ci_low", "ci_high")}


def ranking_rows(select_result: dict) -> list[dict]:
    """One row per candidate backbone of the select stage, in rank order, with every transferability score.

    Args:
        select_result: ``run_select``'s result (``select/ranking.json``): ``ranking`` entries with ``backbone``,
            ``rank``, ``chosen`` and the scores.

    Returns:
        Table rows.
    """
    rows = []
    for entry in sorted(select_result["ranking"], key=lambda e: e.get("rank", math.inf)):
        row = {"rank": entry.get("rank"), "backbone": entry["backbone"], "chosen": bool(entry.get("chosen"))}
        row.update({name: _number(value) for name, value in entry.items()
                    if name not in ("rank", "backbone", "chosen")})
        rows.append(row)
    return rows


def finetune_rows(card: dict) -> list[dict]:
    """One row per fine-tuning epoch (``finetune/model.json``'s history): phase, loss, accuracy, validation AUC.

    Args:
        card: the fine-tuned model's card.

    Returns:
        Table rows.
    """
    rows = []
    for step, epoch in enumerate(card.get("history", []), start=1):
        row = {"step": step, "phase": epoch.get("phase", "finetune"), "epoch": epoch.get("epoch")}
        row.update({name: _number(epoch.get(name)) for name in ("loss", "acc", "val_auc", "lr")})
        rows.append(row)
    return rows


def finetune_description(card: dict) -> str:
    """One line on the fine-tuned model: backbone, strategy, best validation AUC, the negative-transfer check."""
    gate = card.get("negative_transfer") or {}
    best = _number(card.get("best_val_auc"))
    line = (f"{card.get('saved_model', card.get('backbone'))}; best validation AUC {best} at epoch "
            f"{card.get('best_epoch')}")
    return f"{line}. {gate['message']}" if gate.get("message") else line


def adaptation_rows(report: dict) -> list[dict]:
    """One row per adaptation method on the target hospital: AUC with its CI and the difference to source-only;
    first the deployed model there, and the run that the target's labels rank best marked as the upper bound.

    Args:
        report: ``report/report.json`` (its ``adaptation`` section).

    Returns:
        Table rows (none when adaptation did not run), the deployed model first, then the config's method order.
    """
    adaptation = report["adaptation"]
    if not adaptation.get("ran", True):
        return []
    upper = (adaptation.get("upper_bound") or {}).get("method")
    rows = []
    deployed = adaptation.get("deployed")
    if deployed:
        auc, delta = _estimate(deployed.get("auc")), _estimate(deployed.get("delta_auc_vs_comparison"))
        rows.append({"method": f"deployed ({deployed.get('candidate')})", "target": adaptation["target_hospital"],
                     "n": deployed.get("n"), "auc": auc["value"], "auc_ci_low": auc["ci_low"],
                     "auc_ci_high": auc["ci_high"], "delta_auc_vs_source_only": None, "delta_ci_low": None,
                     "delta_ci_high": None, "delta_auc_vs_finetuned": delta["value"],
                     "upper_bound_uses_target_labels": False, "deployed": True})
    before = adaptation.get("before_adaptation")
    if before:
        auc, delta = _estimate(before.get("auc")), _estimate(before.get("delta_auc_vs_baseline"))
        rows.append({"method": f"{before['model']} (before adaptation)", "target": adaptation["target_hospital"],
                     "n": before.get("n"), "auc": auc["value"], "auc_ci_low": auc["ci_low"],
                     "auc_ci_high": auc["ci_high"], "delta_auc_vs_source_only": delta["value"],
                     "delta_ci_low": delta["ci_low"], "delta_ci_high": delta["ci_high"], "delta_auc_vs_finetuned": None,
                     "upper_bound_uses_target_labels": False, "deployed": False})
    for method, entry in adaptation["methods"].items():
        auc, delta = _estimate(entry.get("auc")), entry.get("delta_auc_vs_baseline")
        delta = _estimate(delta) if delta else {"value": None, "ci_low": None, "ci_high": None}
        rows.append({"method": method, "target": adaptation["target_hospital"], "n": entry.get("n"),
                     "auc": auc["value"], "auc_ci_low": auc["ci_low"], "auc_ci_high": auc["ci_high"],
                     "delta_auc_vs_source_only": delta["value"], "delta_ci_low": delta["ci_low"],
                     "delta_ci_high": delta["ci_high"], "delta_auc_vs_finetuned": None,
                     "upper_bound_uses_target_labels": method == upper, "deployed": False})
    return rows


def site_rows(site_results: list[dict]) -> list[dict]:
    """One row per hospital: the deployed model's metrics with their 95 % CIs (per-site evaluation results).

    Args:
        site_results: ``run_evaluate_site`` results (``{"hospital", "metrics", ...}``).

    Returns:
        Table rows, in the given order.
    """
    rows = []
    for result in site_results:
        metrics = result["metrics"]
        row = {"hospital": result["hospital"], "role": metrics.get("role"), "n": metrics.get("n"),
               "n_positive": metrics.get("n_positive"), "n_patients": metrics.get("n_patients")}
        for name in ("auc", "sensitivity", "specificity", "accuracy", "ece"):
            estimate = _estimate(metrics.get(name))
            row.update({name: estimate["value"], f"{name}_ci_low": estimate["ci_low"],
                        f"{name}_ci_high": estimate["ci_high"]})
        rows.append(row)
    return rows


def loho_rows(summary: dict) -> list[dict]:
    """One row per held-out hospital of leave-one-hospital-out: what the model was trained on, its AUC there.

    Args:
        summary: ``run_leave_one_hospital_out``'s result (``loho/summary.json``).

    Returns:
        Table rows, in the summary's hospital order.
    """
    rows = []
    for hospital, entry in summary["held_out"].items():
        low, high = (list(entry.get("auc_ci") or []) + [None, None])[:2]
        rows.append({"held_out": hospital, "trained_on": ", ".join(entry.get("train_hospitals", [])),
                     "train_images": entry.get("train_images"), "test_images": entry.get("test_images"),
                     "auc": _number(entry.get("auc")), "auc_ci_low": _number(low), "auc_ci_high": _number(high),
                     "val_auc": _number(entry.get("val_auc"))})
    return rows


def publish_table(key: str, rows: list[dict], description: str) -> None:
    """Create (a new version of) the table artifact ``key``; nothing for no rows.

    Args:
        key: artifact key (lowercase letters, digits and dashes).
        rows: table rows.
        description: shown above the table (markdown).
    """
    if rows:
        create_table_artifact(table=rows, key=key, description=description)
