"""Per-hospital clinical validation report: a self-contained HTML page for reviewers, the same content as PDF,
a JSON twin for machines, and a short markdown summary for the orchestrator to publish.

Every number in the report comes from :mod:`medtl.evaluate.metrics` (patient-level bootstrap CIs).
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global
backend state) and embedded as base64 PNG.

The report describes one model, the deployed one (``context['primary_model']``, :mod:`medtl.deploy`); the
fine-tuned model before adaptation (``context['comparison_model']``) and every adaptation run are comparison rows.
No headline number is chosen on the data it is measured on: the adaptation run with the best target AUC is chosen
with the target's labels, so it appears only in the adaptation table, labelled as an upper bound.

The report has fixed sections (:data:`REQUIRED_SECTIONS`): summary, intended use, data provenance with the
data-use table (which images each stage read), model development with the negative-transfer check and the
deployed model, per-hospital performance with ROC and calibration figures, the operating point, subgroups, shift
between hospitals, label shift (prevalence estimated without labels), the shortcut audit, performance expected
without labels, adaptation, failure examples, limitations and a map to the TRIPOD+AI reporting items. :func:`validate_report` refuses a report dict that lacks any of them, so a report
that reaches a reviewer is never silently incomplete. Optional sections (:data:`OPTIONAL_SECTIONS`: the
leave-one-hospital-out results, when the run has them) are checked the same way when present.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from medtl.config import REPORT_DEFAULT_MARKER, ReportConfig
from medtl.evaluate.label_free import estimated_drop_warning
from medtl.evaluate.metrics import METRIC_NAMES, auc_difference, binary_metrics, calibration_curve
from medtl.workspace import atomic_write

log = logging.getLogger("medtl")

PREDICTION_COLUMNS: tuple[str, ...] = ("model", "hospital", "role", "patient_id", "label", "prob")
OPTIONAL_PREDICTION_COLUMNS: tuple[str, ...] = ("image", "image_id", "vendor", "sex", "age", "raw_prob")
"""``image``: path of the preprocessed array (``.npy``) for failure-example thumbnails; ``image_id``: its
de-identified id shown in the report (default: a hash of ``image``, never the path); ``vendor`` / ``sex`` /
``age`` (years, or a DICOM age string such as ``"045Y"``): subgroup attributes; ``raw_prob``: the network's own
probability before recalibration and prior correction (the primary model's rows), for the calibration table."""
ROLES: tuple[str, ...] = ("source", "target", "external")
BASELINE_MODEL = "source_only"

REQUIRED_CONTEXT: dict[str, type | tuple[type, ...]] = {
    "title": str,
    "intended_use": str,
    "primary_model": str,
    "threshold": (int, float),
    "threshold_source": str,
    "cohort": list,
    "ingest": dict,
    "backbone_ranking": list,
    "finetune": dict,
    "adaptation": dict,
    "deployed": dict,
    "data_use": dict,
    "shift_diagnostics": dict,
    "limitations": list,
    "provenance": dict,
}
COHORT_KEYS = ("hospital", "role", "vendor", "model", "n_images", "n_patients", "n_labeled", "prevalence")
INGEST_KEYS = ("files_in", "ingested", "quarantined", "duplicates", "skipped", "to_retry")
"""``files_in`` and the outcomes that account for it (skipped: not read, with a reason; to_retry: a resource limit
stopped the file, the next run parses it again)."""
RANKING_KEYS = ("backbone", "logme", "linear_probe_auc", "rank", "chosen")
ADAPTATION_KEYS = ("ran", "target_hospital", "methods")
DEPLOYED_KEYS = ("origin", "calibration", "label_shift")
DATA_USE_KEYS = ("stages", "hospitals")
PROVENANCE_KEYS = ("medtl_version", "sites")
PROVENANCE_SITE_KEYS = ("hospital", "content_sha256", "study_dates")
SHIFT_KEYS = ("reference", "n_reference", "features", "comparisons")
SHIFT_COMPARISON_KEYS = ("site", "n_site", "proxy_a_distance", "domain_balanced_accuracy", "mmd2", "mmd_p_value",
                         "differences")
NEGATIVE_TRANSFER_KEYS = ("negative", "message")
LOHO_KEYS = ("backbone", "strategy", "held_out")
LOHO_HELD_OUT_KEYS = ("train_hospitals", "train_images", "val_images", "test_images", "auc", "auc_ci")
"""``context['leave_one_hospital_out']`` (``loho/summary.json`` as written) and each of its ``held_out`` entries."""
LOHO_CONFIDENCE = 0.95  # the level of a loho/summary.json written before summaries recorded theirs

REQUIRED_SECTIONS: dict[str, tuple[str, ...]] = {
    "summary": ("paragraphs",),
    "intended_use": ("text", "is_default"),
    "data_provenance": ("code", "sites", "ingest"),
    "model_development": ("backbone_ranking", "finetune"),
    "negative_transfer": ("checked", "message"),
    "deployed_model": ("model", "origin", "threshold", "calibration", "label_shift"),
    "data_use": ("stages", "hospitals", "external_unseen"),
    "per_hospital": (),
    "figures": ("roc_hospitals", "calibration"),
    "operating_point": ("threshold", "threshold_source", "per_site"),
    "subgroups": ("attributes",),
    "shift_diagnostics": ("reference", "comparisons"),
    "recalibration": ("available", "sites"),
    "label_shift": ("available", "sites"),
    "shortcut_audit": ("available", "label", "hospital", "warnings"),
    "performance_estimates": ("available", "sites"),
    "adaptation": ("ran", "target_hospital", "methods"),
    "failure_examples": ("available", "false_positives", "false_negatives"),
    "limitations": ("items",),
    "tripod_ai": ("guideline", "items"),
}
"""Sections of the report dict (and report.json) → keys each must hold; checked by :func:`validate_report`."""

OPTIONAL_SECTIONS: dict[str, tuple[str, ...]] = {
    "leave_one_hospital_out": ("backbone", "strategy", "confidence", "comparison_model", "held_out", "notes"),
}
"""Sections a report may lack (the run did not produce them) → keys each must hold when present."""
OPTIONAL_SECTION_ROWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "leave_one_hospital_out": ("held_out", ("hospital", "role", "train_hospitals", "train_images", "val_images",
                                            "test_images", "auc", "comparison")),
}
"""Optional section → (its list of rows, keys each row must hold)."""

# Review flags, not gates: the report states them, a human decides.
MIN_AUC_CI_LOW = 0.7      # lower CI bound below this = discrimination not demonstrated at that site
MAX_ECE = 0.10            # average probability error above 10 points = probabilities need recalibration
MIN_PER_CLASS = 10        # fewer positives or negatives than this = CIs too wide to support a claim

_BOOTSTRAP_SEED = 0       # fixed so that re-rendering a report reproduces its numbers exactly
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")  # Okabe-Ito
_TARGET_RANKING_COLUMNS = ("source_rank", "target_ensv", "target_divergence", "target_rank")
"""Columns of a target-aware ranking, shown in a table of their own."""
_COLUMN_TITLES = {"rank": "Rank", "backbone": "Backbone", "logme": "LogME", "linear_probe_auc": "Linear probe AUC",
                  "h_score": "H-score", "knn_accuracy": "k-NN accuracy", "leep": "LEEP", "nce": "NCE",
                  "source_rank": "Rank on the source", "target_ensv": "EnsV on the target",
                  "target_divergence": "Source–target distance", "target_rank": "Rank on the target"}
_ROLE_HELP = {
    "source": "training hospital, evaluated on held-out patients",
    "target": "adapted to without its labels (its unlabeled images only)",
    "external": "no stage that built the deployed model read its images (see “Which images each stage read”)",
}
# HTML id → heading, in page order; the TRIPOD+AI map points at these ids. Numbered by _sections, which leaves
# out an optional section the report does not have (so the numbers have no gap).
_SECTION_TITLES: dict[str, str] = {
    "summary": "Summary",
    "intended-use": "Intended use",
    "data": "Data provenance",
    "model": "Model development and the deployed model",
    "hospitals": "Performance per hospital",
    "operating-point": "Operating point",
    "subgroups": "Subgroups",
    "shift": "Shift between hospitals",
    "label-shift": "Prevalence of the finding at each hospital",
    "shortcuts": "Shortcut and confounder audit",
    "expected": "Performance expected without labels",
    "adaptation": "Adaptation to the target hospital",
    "loho": "Leave-one-hospital-out (multi-source training)",
    "failures": "Failure examples",
    "limitations": "Limitations",
    "tripod": "TRIPOD+AI map",
}
_OPTIONAL_HTML_SECTIONS = {"loho": "leave_one_hospital_out"}  # HTML id → the optional report section it shows
# (item, topic, section id or None = not covered, note). Item numbers and topics follow the TRIPOD+AI checklist,
# Collins et al., BMJ 2024;385:e078378. _TRIPOD_SEE_ALSO adds an optional section to an item when the report has it.
_TRIPOD_AI: tuple[tuple[str, str, str | None, str], ...] = (
    ("1", "Title", "summary", "the report title (report.title)"),
    ("2", "Abstract", "summary", "plain-language summary and headline AUCs"),
    ("3a", "Healthcare context and rationale", None, "the site's to document"),
    ("3b", "Target population, care pathway, intended users", "intended-use", ""),
    ("3c", "Known health inequalities", "subgroups", "performance by sex and age where recorded"),
    ("4", "Objectives (development / evaluation)", "summary", ""),
    ("5a", "Data sources", "data", ""),
    ("5b", "Data dates", "data", "study dates where the manifest records them"),
    ("6a", "Setting, number and location of centres", "data", ""),
    ("6b", "Eligibility criteria", "data", "technical exclusions (quarantine) only; clinical criteria not covered"),
    ("6c", "Treatments received", None, "not applicable to image-based detection unless the site says otherwise"),
    ("7", "Data preparation", "data", "ingestion, de-identification and quarantine accounting"),
    ("8", "Outcome (definition, assessment, blinding)", None, "how the reference labels were assigned"),
    ("9", "Predictors", "data", "the only input is the preprocessed image, fixed by the configuration hash"),
    ("10", "Sample size", "hospitals", "images, patients and positives per hospital; no formal calculation"),
    ("11", "Missing data", "data", "unreadable or unsafe files are quarantined and counted"),
    ("12", "Analytical methods", "model", "selection, fine-tuning, adaptation and bootstrap statistics"),
    ("13", "Class imbalance", "data", "prevalence per hospital"),
    ("14", "Fairness", "subgroups", ""),
    ("15", "Model output", "operating-point", "probability of the finding and the fixed threshold"),
    ("16", "Training versus evaluation data", "data", "which images each stage read, per hospital"),
    ("17", "Ethical approval", None, ""),
    ("18", "Open science (funding, conflicts, protocol, registration, data and code)", "data",
     "code version and data hashes only; the rest not covered"),
    ("19", "Patient and public involvement", None, ""),
    ("20", "Participants (flow, characteristics)", "data", ""),
    ("21", "Model development (participants, events)", "model", ""),
    ("22", "Model specification", "model", ""),
    ("23", "Model performance", "hospitals", "discrimination and calibration with CIs, also per subgroup"),
    ("24", "Model updating", "adaptation", "unsupervised adaptation to the target hospital"),
    ("25", "Interpretation", "summary", "automatic review flags; the clinical interpretation is the reviewer's"),
    ("26", "Limitations", "limitations", ""),
    ("27", "Usability in current care", "failures", "failure examples and input quarantine; workflow not covered"),
)
# 23 (performance, incl. heterogeneity across clusters): how the recipe does at each hospital left out of training
_TRIPOD_SEE_ALSO: dict[str, tuple[str, ...]] = {"9": ("shortcuts",), "13": ("label-shift",), "23": ("loho",),
                                                 "25": ("expected",)}
_AGE_GROUPS: tuple[tuple[float, float, str], ...] = ((0, 40, "age under 40"), (40, 65, "age 40–64"),
                                                     (65, math.inf, "age 65 and over"))
_SEX_LABELS = {"f": "female", "female": "female", "m": "male", "male": "male", "o": "other", "other": "other"}
_NOT_RECORDED = "not recorded"
_THUMBNAIL_PX = 128
_TEMPLATES = Path(__file__).parent / "templates"


class ReportSchemaError(ValueError):
    """A report dict lacks a required section or a section lacks a required key."""


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote and computed.

    Attributes:
        html_path: the self-contained HTML report.
        json_path: its JSON twin (same content as ``metrics``).
        summary_markdown: headline tables in markdown, for a Prefect markdown artifact.
        metrics: every section of the report plus the context, JSON-ready (NaN stored as None).
        pdf_path: the PDF version, or None when it was disabled or no renderer worked (logged as a warning).
        pdf_renderer: what drew the PDF (``"xhtml2pdf"`` or ``"chromium"``), None without a PDF.
    """

    html_path: Path
    json_path: Path
    summary_markdown: str
    metrics: dict
    pdf_path: Path | None = None
    pdf_renderer: str | None = None


def build_report(predictions: pd.DataFrame, context: dict, cfg: ReportConfig, out_dir: Path) -> ReportResult:
    """Compute every report section and write ``report.html``, ``report.json`` and (best effort) ``report.pdf``.

    Args:
        predictions: one row per evaluated image with columns ``model`` (e.g. "source_only"),
            ``hospital``, ``role`` ("source" / "target" / "external"), ``patient_id``, ``label`` (0/1)
            and ``prob`` (predicted P(label = 1)); optionally :data:`OPTIONAL_PREDICTION_COLUMNS`
            (image paths for failure examples, subgroup attributes). Patient ids are used only to
            resample patients; they never appear in the outputs.
        context: run facts shown in the report; required keys are :data:`REQUIRED_CONTEXT`
            (``cohort`` entries need :data:`COHORT_KEYS`, ``ingest`` needs :data:`INGEST_KEYS`,
            ``backbone_ranking`` entries need :data:`RANKING_KEYS`, ``adaptation`` needs
            :data:`ADAPTATION_KEYS`, ``provenance`` needs :data:`PROVENANCE_KEYS` with one
            :data:`PROVENANCE_SITE_KEYS` entry per cohort hospital, ``shift_diagnostics`` is
            :func:`medtl.evaluate.shift.shift_diagnostics` output); optional: ``provenance.git_commit``
            and other provenance facts, ``adaptation.notes``, ``adaptation.selection`` (rows ``{scorer, candidate,
            target_auc, auc_gap_to_oracle, chosen, uses_target_labels}``: each unsupervised scorer's pick and the
            oracle's), ``ingest.quarantine_reasons`` (reason → count),
            ``finetune.negative_transfer`` (``{checked, transfer_val_auc, scratch_val_auc, delta, negative,
            message, fallback_applied}``), ``leave_one_hospital_out`` (``loho/summary.json`` as
            :func:`medtl.stages.run_leave_one_hospital_out` writes it: :data:`LOHO_KEYS`, each ``held_out``
            entry with :data:`LOHO_HELD_OUT_KEYS`), which adds the optional leave-one-hospital-out section.
        cfg: bootstrap size, confidence level, calibration bins, number of failure examples and whether to
            write a PDF (the title shown is ``context['title']``, typically set from ``cfg.title``).
        out_dir: folder to write into (created when missing); existing reports are replaced atomically.

    Returns:
        :class:`ReportResult` with the paths, the markdown summary and the report dict.

    Raises:
        ValueError: naming the missing / malformed context key or prediction column.
        ReportSchemaError: naming a report section that came out missing (a bug, never the user's input).
    """
    ctx = _validate_context(context)
    preds = _validate_predictions(predictions, ctx)
    metrics = _compute(preds, ctx, cfg)
    metrics["figures"] = _figures(preds, metrics, cfg)
    payload = jsonable({**metrics, "context": ctx})
    validate_report(payload)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path, pdf_path = out_dir / "report.html", out_dir / "report.json", out_dir / "report.pdf"
    html = _render_html(metrics, ctx, pdf=False)  # render before writing either file: both or neither
    pdf_html = _render_html(metrics, ctx, pdf=True) if cfg.pdf else None
    _write_atomic(json_path, json.dumps(payload, indent=2, allow_nan=False))
    _write_atomic(html_path, html)
    renderer = _write_pdf(pdf_html, html_path, pdf_path) if pdf_html is not None else None
    if renderer is None:
        pdf_path.unlink(missing_ok=True)  # a PDF left from an earlier run would contradict report.json
    return ReportResult(html_path=html_path, json_path=json_path, summary_markdown=_summary_markdown(metrics),
                        metrics=payload, pdf_path=pdf_path if renderer else None, pdf_renderer=renderer)


def validate_report(report: dict) -> None:
    """Check that a report dict (e.g. a loaded report.json) holds every section a reviewer signs off.

    Optional sections (:data:`OPTIONAL_SECTIONS`) may be absent; one that is present is checked like a required
    one, and so are its rows (:data:`OPTIONAL_SECTION_ROWS`).

    Args:
        report: the dict :func:`build_report` returns as ``metrics`` and writes as report.json.

    Raises:
        ReportSchemaError: naming the first missing section, or the missing key of a section or of a row.
    """
    if not isinstance(report, dict):
        raise ReportSchemaError(f"a report must be a dict of sections, got {type(report).__name__}")
    for section, keys in REQUIRED_SECTIONS.items():
        if report.get(section) is None:
            raise ReportSchemaError(
                f"report is missing required section {section!r}; a report for sign-off needs all of "
                f"{', '.join(REQUIRED_SECTIONS)}. Generate it with medtl.evaluate.build_report (medtl report).")
        _check_section(report, section, keys)
    for section, keys in OPTIONAL_SECTIONS.items():
        if report.get(section) is None:
            continue
        _check_section(report, section, keys)
        if section in OPTIONAL_SECTION_ROWS:
            rows_key, row_keys = OPTIONAL_SECTION_ROWS[section]
            rows = report[section][rows_key]
            if not isinstance(rows, list) or not rows:
                raise ReportSchemaError(f"report section {section!r}: {rows_key!r} must be a non-empty list, "
                                        f"got {rows!r:.80}")
            for i, row in enumerate(rows):
                missing = [k for k in row_keys if k not in row] if isinstance(row, dict) else list(row_keys)
                if missing:
                    raise ReportSchemaError(f"report section {section!r}: {rows_key}[{i}] is missing key "
                                            f"{missing[0]!r} (needs {', '.join(row_keys)})")


def _check_section(report: dict, section: str, keys: tuple[str, ...]) -> None:
    """A present section is a non-empty dict holding ``keys``."""
    value = report[section]
    if not isinstance(value, dict) or not value:
        raise ReportSchemaError(f"report section {section!r} must be a non-empty dict, got {value!r:.80}")
    for key in keys:
        if key not in value:
            raise ReportSchemaError(f"report section {section!r} is missing key {key!r} "
                                    f"(needs {', '.join(keys)})")


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
    if not context["intended_use"].strip():
        raise ValueError("context['intended_use'] is empty; state who uses the model, on which patients, for what "
                         "decision (report.intended_use in the configuration)")
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
    if context["adaptation"]["ran"]:
        if not isinstance(methods, list) or not methods:
            raise ValueError("context['adaptation']['methods'] must be a non-empty list of model names when "
                             "adaptation ran (ran: true); with ran: false, give [] and a 'reason'")
    elif methods:
        raise ValueError("context['adaptation'] says adaptation did not run (ran: false) but lists methods "
                         f"{methods!r}; give methods: [] and the 'reason'")
    _require_keys(context["deployed"], DEPLOYED_KEYS, "context['deployed']")
    _require_keys(context["data_use"], DATA_USE_KEYS, "context['data_use']")
    comparison = context.get("comparison_model")
    if comparison is not None and (not isinstance(comparison, str) or comparison == context["primary_model"]):
        raise ValueError(f"context['comparison_model'] must name another model than the primary one, got "
                         f"{comparison!r}")
    _validate_provenance(context)
    _validate_shift(context["shift_diagnostics"])
    block = context["finetune"].get("negative_transfer")
    if block is not None:
        if not isinstance(block, dict):
            raise ValueError("context['finetune']['negative_transfer'] must be a dict {checked, transfer_val_auc, "
                             f"scratch_val_auc, delta, negative, message, fallback_applied}}, got {block!r:.80}")
        if block.get("checked", True):
            _require_keys(block, NEGATIVE_TRANSFER_KEYS, "context['finetune']['negative_transfer']")
    for i, item in enumerate(context["limitations"]):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"context['limitations'][{i}] must be a non-empty sentence, got {item!r}")
    if context.get("leave_one_hospital_out") is not None:
        _validate_loho(context["leave_one_hospital_out"])
    return context


def _validate_loho(summary: dict) -> None:
    """``loho/summary.json``: who was held out, what the model trained on, the held-out AUC and its CI."""
    where = "context['leave_one_hospital_out']"
    _require_keys(summary, LOHO_KEYS, where)
    if not isinstance(summary["held_out"], dict) or not summary["held_out"]:
        raise ValueError(f"{where}['held_out'] must map each held-out hospital to its results (loho/summary.json "
                         "as medtl loho writes it)")
    for hospital, entry in summary["held_out"].items():
        _require_keys(entry, LOHO_HELD_OUT_KEYS, f"{where}['held_out'][{hospital!r}]")
        ci = entry["auc_ci"]
        if not isinstance(ci, (list, tuple)) or len(ci) != 2:
            raise ValueError(f"{where}['held_out'][{hospital!r}]['auc_ci'] must be [low, high], got {ci!r}")
        if not isinstance(entry["train_hospitals"], list) or hospital in entry["train_hospitals"]:
            raise ValueError(f"{where}['held_out'][{hospital!r}]['train_hospitals'] must list the other hospitals "
                             f"the model was trained on, got {entry['train_hospitals']!r}")


def _validate_provenance(context: dict) -> None:
    provenance = context["provenance"]
    _require_keys(provenance, PROVENANCE_KEYS, "context['provenance']")
    if not isinstance(provenance["sites"], list):
        raise ValueError("context['provenance']['sites'] must be a list with one entry per hospital")
    for i, row in enumerate(provenance["sites"]):
        _require_keys(row, PROVENANCE_SITE_KEYS, f"context['provenance']['sites'][{i}]")
    recorded = {row["hospital"] for row in provenance["sites"]}
    for row in context["cohort"]:
        if row["hospital"] not in recorded:
            raise ValueError(f"context['provenance']['sites'] has no entry for hospital {row['hospital']!r}; every "
                             "cohort hospital needs its content hash and study dates (None = not recorded)")


def _validate_shift(shift: dict) -> None:
    _require_keys(shift, SHIFT_KEYS, "context['shift_diagnostics']")
    if not isinstance(shift["comparisons"], list):
        raise ValueError("context['shift_diagnostics']['comparisons'] must be a list (shift_diagnostics output)")
    for i, row in enumerate(shift["comparisons"]):
        _require_keys(row, SHIFT_COMPARISON_KEYS, f"context['shift_diagnostics']['comparisons'][{i}]")


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
    optional = [c for c in OPTIONAL_PREDICTION_COLUMNS if c in predictions.columns]
    preds = predictions.loc[:, [*PREDICTION_COLUMNS, *optional]].copy()
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
    if "image" in preds and "image_id" not in preds:
        # A hash, not the file name: a caller's file names may carry identifiers.
        preds["image_id"] = [None if _missing(p) else "img-" + hashlib.sha256(str(p).encode()).hexdigest()[:16]
                             for p in preds["image"]]
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
    for key in ("primary_model", "comparison_model"):
        model = ctx.get(key)
        if model is not None and not (preds["model"] == model).any():
            raise ValueError(f"context[{key!r}] is {model!r} but predictions has no rows for it "
                             f"(models present: {sorted(preds['model'].unique())})")
    if not ctx["adaptation"]["ran"]:
        return preds
    if target not in site_role:
        raise ValueError(f"context['adaptation']['target_hospital'] is {target!r} but predictions has no rows "
                         f"for it (hospitals present: {sorted(site_role)})")
    on_target = set(preds.loc[preds["hospital"] == target, "model"])
    for method in ctx["adaptation"]["methods"]:
        if method not in on_target:
            raise ValueError(f"context['adaptation']['methods'] lists {method!r} but predictions has no rows for "
                             f"it on {target!r}; add its predictions or drop it from the list")
    return preds


def _missing(value: Any) -> bool:
    """None, NaN, pd.NA or a blank string."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


# ---------------------------------------------------------------------------------------------
# metrics

def _hospital_order(preds: pd.DataFrame, ctx: dict) -> list[str]:
    """Cohort order when given, else source → target → external, then by name."""
    cohort_pos = {row["hospital"]: i for i, row in enumerate(ctx["cohort"])}
    site_role = preds.groupby("hospital")["role"].first()
    return sorted(site_role.index, key=lambda h: (cohort_pos.get(h, len(cohort_pos)), ROLES.index(site_role[h]), h))


def _bootstrap(rows: pd.DataFrame, threshold: float, cfg: ReportConfig) -> dict:
    return binary_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), threshold=threshold,
                          groups=rows["patient_id"].to_numpy(), n_bootstrap=cfg.n_bootstrap,
                          confidence=cfg.confidence, n_bins=cfg.calibration_bins, seed=_BOOTSTRAP_SEED)


def _evaluate(rows: pd.DataFrame, threshold: float, cfg: ReportConfig) -> dict:
    result = _bootstrap(rows, threshold, cfg)
    curve = calibration_curve(rows["label"].to_numpy(), rows["prob"].to_numpy(), cfg.calibration_bins)
    result["calibration"] = {"mean_predicted": curve.mean_predicted, "observed_frequency": curve.observed_frequency,
                             "counts": curve.counts, "bin_edges": curve.bin_edges}
    if 0 < result["n_positive"] < result["n"]:
        fpr, tpr, cuts = roc_curve(rows["label"].to_numpy(), rows["prob"].to_numpy())
        result["roc"] = {"fpr": fpr, "tpr": tpr, "thresholds": cuts}  # the figure's data, for re-plotting
    else:
        result["roc"] = None
    return result


def site_metrics(rows: pd.DataFrame, threshold: float, cfg: ReportConfig) -> dict:
    """One hospital's entry of the report's ``per_hospital`` section, as ``report.json`` holds it.

    Lets a caller evaluate sites separately (e.g. one task per hospital) and get exactly the report's numbers:
    the same bootstrap (patient-level, fixed seed), calibration and ROC.

    Args:
        rows: one model's predictions at one hospital, with ``role``, ``patient_id``, ``label`` and ``prob``.
        threshold: the operating threshold.
        cfg: the ``report`` section (bootstrap size, confidence level, calibration bins).

    Returns:
        ``{"role", "auc", ..., "calibration", "roc"}`` in plain JSON types.

    Raises:
        ValueError: when ``rows`` is empty or spans several hospitals or roles.
    """
    if len(rows) == 0:
        raise ValueError("site_metrics needs at least one prediction")
    for column in ("hospital", "role"):
        if column in rows and rows[column].nunique() > 1:
            raise ValueError(f"site_metrics takes one hospital's rows; these have several {column}s: "
                             f"{sorted(rows[column].astype(str).unique())}")
    rows = rows.assign(label=rows["label"].astype("int64"), prob=rows["prob"].astype("float64"))
    return jsonable({"role": str(rows["role"].iloc[0]), **_evaluate(rows, float(threshold), cfg)})


def _compute(preds: pd.DataFrame, ctx: dict, cfg: ReportConfig) -> dict:
    threshold = float(ctx["threshold"])
    primary = ctx["primary_model"]
    site_role = preds.groupby("hospital")["role"].first().to_dict()
    primary_rows = preds[preds["model"] == primary]

    per_hospital: dict[str, dict] = {}
    for hospital in _hospital_order(preds, ctx):
        rows = primary_rows[primary_rows["hospital"] == hospital]
        if len(rows):
            per_hospital[hospital] = {"role": site_role[hospital], **_evaluate(rows, threshold, cfg)}

    limitations = [{"text": item.removeprefix(REPORT_DEFAULT_MARKER).strip(),
                    "default": item.startswith(REPORT_DEFAULT_MARKER)} for item in ctx["limitations"]]
    metrics = {
        "schema_version": 3,
        "title": ctx["title"],
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"threshold": threshold, "threshold_source": ctx["threshold_source"],
                     "n_bootstrap": cfg.n_bootstrap, "confidence": cfg.confidence,
                     "calibration_bins": cfg.calibration_bins, "bootstrap_unit": "patient",
                     "bootstrap_seed": _BOOTSTRAP_SEED},
        "primary_model": primary,
        "comparison_model": ctx.get("comparison_model"),
        "intended_use": {"text": ctx["intended_use"].removeprefix(REPORT_DEFAULT_MARKER).strip(),
                         "is_default": ctx["intended_use"].startswith(REPORT_DEFAULT_MARKER)},
        "data_provenance": _data_provenance(ctx),
        "data_use": _data_use_section(ctx),
        "model_development": {"backbone_ranking": ctx["backbone_ranking"],
                              "backbone_selection": ctx.get("backbone_selection") or {},
                              "finetune": {k: v for k, v in ctx["finetune"].items() if k != "negative_transfer"}},
        "negative_transfer": _negative_transfer(ctx["finetune"]),
        "deployed_model": _deployed_model(ctx, threshold),
        "per_hospital": per_hospital,
        "recalibration": _recalibration(primary_rows, per_hospital, cfg),
        "operating_point": _operating_point(primary_rows, per_hospital, threshold, ctx["threshold_source"]),
        "subgroups": {"model": primary, "attributes": _subgroups(primary_rows, ctx, per_hospital, threshold, cfg)},
        "shift_diagnostics": ctx["shift_diagnostics"],
        "label_shift": _label_shift(ctx, per_hospital),
        "shortcut_audit": _shortcut_section(ctx.get("shortcut_audit")),
        "performance_estimates": _performance_estimates(ctx, per_hospital),
        "adaptation": _adaptation(preds, ctx, threshold, cfg),
        "failure_examples": _failure_examples(primary_rows, threshold, cfg.failure_examples),
        "limitations": {"items": limitations},
    }
    loho = _leave_one_hospital_out(ctx.get("leave_one_hospital_out"), ctx, per_hospital, primary)
    if loho is not None:  # optional: only when the run has loho/summary.json
        metrics["leave_one_hospital_out"] = loho
    metrics["tripod_ai"] = _tripod_map(_sections(metrics))
    metrics["summary"] = {"paragraphs": _plain_summary(metrics)}
    metrics["warnings"] = _warnings(metrics, ctx)
    return metrics


def _adaptation(preds: pd.DataFrame, ctx: dict, threshold: float, cfg: ReportConfig) -> dict:
    """Every adaptation run on the target next to the deployed model and the fine-tuned model before adaptation.

    The run with the best AUC on the target is found with the target's labels: it is reported as
    ``upper_bound`` (what the best candidate reached, which no label-free choice is guaranteed to find), never as
    the result. ``deployed`` is the deployed model there, with its paired AUC difference to the comparison model.
    """
    adaptation = ctx["adaptation"]
    target = adaptation["target_hospital"]
    if not adaptation["ran"]:
        return {"ran": False, "target_hospital": target, "methods": {}, "baseline_model": BASELINE_MODEL,
                "baseline_auc": None, "upper_bound": None, "deployed": None, "before_adaptation": None,
                "selection": [],
                "reason": adaptation.get("reason") or "adaptation did not run"}
    on_target = preds[preds["hospital"] == target]
    baseline = on_target[on_target["model"] == BASELINE_MODEL]

    def paired_delta(rows: pd.DataFrame, reference: pd.DataFrame) -> dict:
        return auc_difference(rows["label"].to_numpy(), rows["prob"].to_numpy(), reference["label"].to_numpy(),
                              reference["prob"].to_numpy(), groups_a=rows["patient_id"].to_numpy(),
                              groups_b=reference["patient_id"].to_numpy(), n_bootstrap=cfg.n_bootstrap,
                              confidence=cfg.confidence, seed=_BOOTSTRAP_SEED)

    methods: dict[str, dict] = {}
    for method in adaptation["methods"]:
        rows = on_target[on_target["model"] == method]
        entry = _evaluate(rows, threshold, cfg)
        if len(baseline) and method != BASELINE_MODEL:
            entry["delta_auc_vs_baseline"] = paired_delta(rows, baseline)
        methods[method] = entry
    adapted = {m: e["auc"]["value"] for m, e in methods.items()
               if m != BASELINE_MODEL and not math.isnan(e["auc"]["value"])}
    best = max(adapted, key=adapted.get) if adapted else None
    baseline_auc = (methods[BASELINE_MODEL]["auc"] if BASELINE_MODEL in methods
                    else _bootstrap(baseline, threshold, cfg)["auc"] if len(baseline) else None)
    deployed_rows = on_target[on_target["model"] == ctx["primary_model"]]
    comparison = ctx.get("comparison_model")
    comparison_rows = on_target[on_target["model"] == comparison] if comparison else on_target.iloc[:0]
    deployed = None
    if len(deployed_rows):
        deployed = {"model": ctx["primary_model"], "candidate": adaptation.get("deployed_candidate"),
                    "uses_target_labels": False, **_evaluate(deployed_rows, threshold, cfg)}
    before = None
    if len(comparison_rows):
        before = {"model": comparison, **_evaluate(comparison_rows, threshold, cfg)}
        if len(baseline):
            before["delta_auc_vs_baseline"] = paired_delta(comparison_rows, baseline)
        if deployed is not None:
            deployed["comparison_model"] = comparison
            deployed["comparison_auc"] = before["auc"]
            deployed["delta_auc_vs_comparison"] = paired_delta(deployed_rows, comparison_rows)
    return {"ran": True, "target_hospital": target, "baseline_model": BASELINE_MODEL, "baseline_auc": baseline_auc,
            "upper_bound": (None if best is None else
                            {"method": best, "auc": methods[best]["auc"], "uses_target_labels": True,
                             "note": "the run with the best AUC on the target's labeled images: chosen with those "
                                     "labels, an upper bound on what a label-free choice among these runs could "
                                     "reach, not a result"}),
            "deployed": deployed, "before_adaptation": before, "methods": methods,
            "selection": _as_list(adaptation.get("selection"))}


def _deployed_model(ctx: dict, threshold: float) -> dict:
    """What is deployed: the model, where it came from, its operating point, calibration and prior correction."""
    deployed = ctx["deployed"]
    return {"model": ctx["primary_model"], "origin": deployed["origin"], "file": deployed.get("file"),
            "sha256": deployed.get("sha256"), "backbone": deployed.get("backbone"), "threshold": threshold,
            "threshold_source": ctx["threshold_source"], "calibration": deployed["calibration"],
            "label_shift": deployed["label_shift"], "comparison_model": ctx.get("comparison_model")}


def _data_use_section(ctx: dict) -> dict:
    """The data-use table, and whether every external hospital was read by evaluation alone."""
    use = ctx["data_use"]
    # separate models (leave-one-hospital-out) do not build the deployed model; evaluation must read every site
    building = [key for key, stage in use["stages"].items() if stage.get("ran") and key not in ("evaluation", "loho")]
    breaches = []
    for row in use["hospitals"]:
        if row["role"] != "external":
            continue
        for key in building:
            n = row["read"].get(key)
            if n:
                breaches.append({"hospital": row["hospital"], "stage": key,
                                 "stage_label": use["stages"][key]["label"], "images": n})
    return {"stages": use["stages"], "hospitals": use["hospitals"], "notes": list(use.get("notes") or []),
            "external_unseen": not breaches, "breaches": breaches}


def _recalibration(primary_rows: pd.DataFrame, per_hospital: dict, cfg: ReportConfig) -> dict:
    """Per site, the ECE of the network's own probabilities next to the deployed ones (after recalibration and,
    at the target, the prior correction), when the predictions carry both."""
    if "raw_prob" not in primary_rows or primary_rows["raw_prob"].isna().all():
        return {"available": False, "sites": [],
                "reason": "the predictions carry no raw_prob column (the network's probabilities before "
                          "recalibration)"}
    sites = []
    for hospital, m in per_hospital.items():
        rows = primary_rows[primary_rows["hospital"] == hospital]
        raw = rows.assign(prob=rows["raw_prob"].astype("float64"))
        before = binary_metrics(raw["label"].to_numpy(), raw["prob"].to_numpy(),
                                groups=raw["patient_id"].to_numpy(), n_bootstrap=cfg.n_bootstrap,
                                confidence=cfg.confidence, n_bins=cfg.calibration_bins, seed=_BOOTSTRAP_SEED)
        sites.append({"hospital": hospital, "role": m["role"], "ece_network": before["ece"], "ece_deployed": m["ece"],
                      "brier_network": before["brier"], "brier_deployed": m["brier"]})
    return {"available": True, "sites": sites}


def _label_shift(ctx: dict, per_hospital: dict) -> dict:
    """Estimated prevalence of the finding per site (from images without their labels) next to the source
    hospitals' and, where labels exist, the true one, as a check of the estimate."""
    estimates = ctx.get("prevalence")
    if not estimates:
        return {"available": False, "sites": [], "reason": "the run estimated no prevalence (medtl deploy)"}
    sites = []
    for hospital, entry in sorted(estimates.items(), key=lambda item: _cohort_position(ctx, item[0])):
        measured = per_hospital.get(hospital)
        true = measured["n_positive"] / measured["n"] if measured else None
        sites.append({"hospital": hospital, "role": entry["role"], "images": entry["images"],
                      "bbse": entry["bbse"], "em": entry["em"], "inconsistent": entry.get("inconsistent"),
                      "true_prevalence": true,
                      "true_prevalence_n": measured["n"] if measured else None})
    source = next((e[m]["source_prevalence"] for e in estimates.values() for m in ("em", "bbse")
                   if e[m].get("source_prevalence") is not None), None)
    applied = ctx["deployed"]["label_shift"]
    return {"available": True, "sites": sites, "source_prevalence": source, "correction": applied,
            "references": ["Lipton, Wang & Smola, ICML 2018 (BBSE)", "Saerens, Latinne & Decaestecker, Neural "
                           "Computation 2002 (EM)", "Alexandari, Kundaje & Shrikumar, ICML 2020 (calibration "
                           "for EM)"]}


def _cohort_position(ctx: dict, hospital: str) -> tuple[int, str]:
    """Where ``hospital`` comes in the report's order (the cohort's: source, target, external)."""
    order = [row["hospital"] for row in ctx["cohort"]]
    return (order.index(hospital) if hospital in order else len(order), hospital)


def _shortcut_section(audit: dict | None) -> dict:
    if audit is None:
        return {"available": False, "label": [], "hospital": None, "warnings": [],
                "reason": "the run did not audit the acquisition fields"}
    return {"available": True, **audit}


def _ingest_accounted(ingest: dict) -> int:
    """The input entries the ingestion outcomes account for (should equal ``files_in``)."""
    return sum(ingest[key] for key in INGEST_KEYS[1:])


def _expected_figure(row: dict) -> str:
    """One label-free estimate for the summary: its AUC, or its accuracy when it gives no AUC (ATC out of reach)."""
    name = _ESTIMATE_NAMES[row["method"]]
    if math.isnan(_num(row["auc"]["value"])):
        return f"accuracy at the operating threshold {_fmt_ci(row['accuracy'])} ({name}; no AUC estimate)"
    return f"AUC {_fmt_ci(row['auc'])} ({name})"


def _performance_estimates(ctx: dict, per_hospital: dict) -> dict:
    """Per site, the label-free estimates of AUC and accuracy (ATC; the adaptation candidates' agreement at the
    target) next to the measured values where labels exist."""
    estimates = ctx.get("performance_estimates")
    if not estimates:
        return {"available": False, "sites": [], "reason": "the run estimated no performance without labels"}
    sites = []
    for hospital, entry in sorted(estimates.items(), key=lambda item: _cohort_position(ctx, item[0])):
        measured = per_hospital.get(hospital)
        rows = []
        for method in ("atc", "agreement"):
            if method in entry:  # NaN, not None, for numbers a JSON round trip left undefined
                found = {**entry[method], "auc": _interval(entry[method]["auc"]),
                         "accuracy": _interval(entry[method]["accuracy"])}
                rows.append({"method": method, "auc": found["auc"], "accuracy": found["accuracy"],
                             "n": found.get("n"), "notes": found.get("notes") or [], "estimate": found})
        sites.append({"hospital": hospital, "role": entry["role"], "images": entry["images"], "estimates": rows,
                      "measured_auc": measured["auc"] if measured else None,
                      "measured_accuracy": measured["accuracy"] if measured else None,
                      "note": entry.get("agreement_unavailable")})
    source = next((e["atc"].get("details", {}) for e in estimates.values() if "atc" in e), {})
    return {"available": True, "sites": sites, "source_validation_auc": source.get("source_auc"),
            "source_validation_accuracy": source.get("source_accuracy"),
            "references": ["Garg et al., ICLR 2022 (ATC)", "Jiang et al., ICLR 2022; Baek et al., NeurIPS 2022 "
                           "(agreement)"]}


def _sections(metrics: dict) -> dict[str, str]:
    """HTML id → numbered heading of the sections this report has (optional ones only when present)."""
    present = [key for key in _SECTION_TITLES
               if key not in _OPTIONAL_HTML_SECTIONS or metrics.get(_OPTIONAL_HTML_SECTIONS[key]) is not None]
    return {key: f"{number}. {_SECTION_TITLES[key]}" for number, key in enumerate(present, start=1)}


def _tripod_map(sections: dict[str, str]) -> dict:
    """The TRIPOD+AI items with the section covering each, plus the optional sections that add to an item."""
    items = []
    for item, topic, section, note in _TRIPOD_AI:
        also = [{"section": key, "section_title": sections[key]} for key in _TRIPOD_SEE_ALSO.get(item, ())
                if key in sections]
        items.append({"item": item, "topic": topic, "section": section,
                      "section_title": sections[section] if section else None, "covered": section is not None,
                      "note": note, "see_also": also})
    return {"guideline": "TRIPOD+AI (Collins et al., BMJ 2024;385:e078378)", "items": items}


def _leave_one_hospital_out(summary: dict | None, ctx: dict, per_hospital: dict, primary: str) -> dict | None:
    """The leave-one-hospital-out section: each held-out hospital's AUC next to the primary model's there.

    Args:
        summary: ``loho/summary.json`` (validated), or None when the run has none.
        ctx: the report context (cohort roles, the fine-tuning card for the recipe check).
        per_hospital: the primary model's metrics per hospital.
        primary: the primary model's name.

    Returns:
        ``{"backbone", "strategy", "confidence", "comparison_model", "held_out": [row], "notes"}``; each row has
        ``hospital``, ``role`` (None for a hospital not in the cohort), the training hospitals and image counts,
        ``val_auc``, ``auc`` ``{value, ci_low, ci_high}`` and ``comparison`` (the primary model's AUC at that
        hospital, its image count and whether it was trained on that hospital; None where the report has no
        metrics for it). None without a summary.
    """
    if summary is None:
        return None
    roles = {row["hospital"]: row["role"] for row in ctx["cohort"]}
    rows = []
    for hospital, entry in summary["held_out"].items():
        low, high = entry["auc_ci"]
        site = per_hospital.get(hospital)
        comparison = None
        if site is not None:
            comparison = {"auc": site["auc"], "n": site["n"], "trained_on_this_hospital": site["role"] == "source"}
        rows.append({"hospital": hospital, "role": roles.get(hospital, site["role"] if site else None),
                     "train_hospitals": list(entry["train_hospitals"]), "train_images": entry["train_images"],
                     "val_images": entry["val_images"], "test_images": entry["test_images"],
                     "val_auc": _num(entry.get("val_auc")),
                     "auc": {"value": _num(entry["auc"]), "ci_low": _num(low), "ci_high": _num(high)},
                     "comparison": comparison})
    notes = ["Each held-out hospital is tested on all its labeled images; for a source hospital the "
             f"{primary} column uses only its held-out test patients, and {primary} was trained on that hospital's "
             "other patients, so that number is not a new-hospital result."]
    if str(summary["backbone"]).endswith(".ssl"):  # pretrain reads every hospital's images, unless limited
        notes.append(f"The backbone {summary['backbone']} was pretrained self-supervised on this run's images, "
                     "which may include the left-out hospital's (without labels, see pretrain.hospitals); its AUC "
                     "may then be slightly optimistic for a hospital that is truly new.")
    card = ctx["finetune"]
    backbone = card.get("selected_backbone", card.get("backbone"))
    if (backbone is not None and backbone != summary["backbone"]) or (
            card.get("strategy") is not None and card["strategy"] != summary["strategy"]):
        notes.append(f"Leave-one-hospital-out used {summary['backbone']} with strategy {summary['strategy']}, "
                     f"the fine-tuned model {backbone} with strategy {card.get('strategy', 'not recorded')}: "
                     "the two were trained with different recipes (re-run medtl loho to compare like with like).")
    return {"backbone": summary["backbone"], "strategy": summary["strategy"], "confidence": summary.get("confidence", LOHO_CONFIDENCE),
            "bootstrap_unit": "patient", "comparison_model": primary, "held_out": rows, "notes": notes}


def _data_provenance(ctx: dict) -> dict:
    """Sites (cohort counts joined with their content hash and study dates), ingestion, code version."""
    provenance = ctx["provenance"]
    per_site = {row["hospital"]: row for row in provenance["sites"]}
    sites = [{**row, "content_sha256": per_site[row["hospital"]]["content_sha256"],
              "study_dates": per_site[row["hospital"]]["study_dates"]} for row in ctx["cohort"]]
    extra = {k: v for k, v in provenance.items() if k not in ("medtl_version", "git_commit", "sites")}
    return {"code": {"medtl_version": provenance["medtl_version"], "git_commit": provenance.get("git_commit")},
            "sites": sites, "ingest": ctx["ingest"], **extra}


def _negative_transfer(finetune: dict) -> dict:
    block = finetune.get("negative_transfer")
    if block is None:
        return {"checked": False, "message": "the fine-tuning run did not compare the pretrained start with "
                                             "training from scratch."}
    if not block.get("checked", True):
        # the fine-tune stage writes "not checked: <why>"; the report says "Not checked" itself
        reason = str(block.get("message") or "").strip()
        reason = reason[len("not checked"):].lstrip(" :—-") if reason.lower().startswith("not checked") else reason
        return {**block, "checked": False,
                "message": reason or "the fine-tuning run skipped the comparison with training from scratch."}
    return {**block, "checked": True, "negative": bool(block["negative"]),
            "fallback_applied": bool(block.get("fallback_applied", False))}


def _operating_point(primary_rows: pd.DataFrame, per_hospital: dict, threshold: float, source: str) -> dict:
    """Confusion counts per hospital at the fixed threshold, next to the bootstrap sensitivity/specificity."""
    sites = []
    for hospital, m in per_hospital.items():
        rows = primary_rows[primary_rows["hospital"] == hospital]
        flagged = rows["prob"].to_numpy() >= threshold
        finding = rows["label"].to_numpy() == 1
        sites.append({"hospital": hospital, "role": m["role"],
                      "tp": int((flagged & finding).sum()), "fn": int((~flagged & finding).sum()),
                      "tn": int((~flagged & ~finding).sum()), "fp": int((flagged & ~finding).sum()),
                      "sensitivity": m["sensitivity"], "specificity": m["specificity"], "ppv": m["ppv"],
                      "npv": m["npv"]})
    return {"threshold": threshold, "threshold_source": source, "rule": "positive when P(finding) >= threshold",
            "per_site": sites}


def _subgroups(primary_rows: pd.DataFrame, ctx: dict, per_hospital: dict, threshold: float,
               cfg: ReportConfig) -> list[dict]:
    """Site, vendor, sex and age group, each either with per-group metrics or marked not recorded."""
    vendor_of = {row["hospital"]: row["vendor"] for row in ctx["cohort"]}
    attributes = [
        ("hospital", "Hospital (site)", primary_rows["hospital"], list(per_hospital)),
        ("vendor", "Vendor",
         primary_rows["vendor"] if "vendor" in primary_rows else primary_rows["hospital"].map(vendor_of), None),
        ("sex", "Sex", primary_rows["sex"].map(_sex_label) if "sex" in primary_rows else None, None),
        ("age", "Age group", primary_rows["age"].map(_age_group) if "age" in primary_rows else None,
         [label for _, _, label in _AGE_GROUPS]),
    ]
    out = []
    for name, label, values, order in attributes:
        if values is None or all(_missing(v) for v in values):
            out.append({"attribute": name, "label": label, "recorded": False, "groups": [],
                        "note": f"no {label.lower()} is recorded for the evaluated images"})
            continue
        keys = [_NOT_RECORDED if _missing(v) else str(v) for v in values]
        present = list(dict.fromkeys(keys))
        ranked = [g for g in (order or sorted(present)) if g in present and g != _NOT_RECORDED]
        ranked += [g for g in present if g not in ranked and g != _NOT_RECORDED]
        ranked += [_NOT_RECORDED] if _NOT_RECORDED in present else []
        keys_arr = np.asarray(keys, dtype=object)
        groups = []
        for group in ranked:
            m = _bootstrap(primary_rows[keys_arr == group], threshold, cfg)
            groups.append({"group": group, "n": m["n"], "n_patients": m["n_patients"], "n_positive": m["n_positive"],
                           "auc": m["auc"], "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                           "notes": m["notes"]})
        out.append({"attribute": name, "label": label, "recorded": True, "groups": groups, "note": ""})
    return out


def _sex_label(value: Any) -> str | None:
    return None if _missing(value) else _SEX_LABELS.get(str(value).strip().lower())


def _age_years(value: Any) -> float | None:
    """Years from a number or a DICOM age string (``nnnD/W/M/Y``); None when absent or unreadable."""
    if _missing(value):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) and value >= 0 else None
    text = str(value).strip().upper()
    per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}
    if len(text) >= 2 and text[-1] in per_year and text[:-1].isdigit():
        return int(text[:-1]) / per_year[text[-1]]
    try:
        years = float(text)
    except ValueError:
        return None
    return years if math.isfinite(years) and years >= 0 else None


def _age_group(value: Any) -> str | None:
    years = _age_years(value)
    if years is None:
        return None
    return next(label for low, high, label in _AGE_GROUPS if low <= years < high)


def _failure_examples(primary_rows: pd.DataFrame, threshold: float, k: int) -> dict:
    """The ``k`` most confident false positives and false negatives, with thumbnails of their arrays."""
    wrong_positive = primary_rows[(primary_rows["label"] == 0) & (primary_rows["prob"] >= threshold)]
    wrong_negative = primary_rows[(primary_rows["label"] == 1) & (primary_rows["prob"] < threshold)]
    out = {"threshold": threshold, "n_false_positives": len(wrong_positive), "n_false_negatives": len(wrong_negative),
           "false_positives": [], "false_negatives": []}
    if k == 0:
        return {**out, "available": False, "reason": "Turned off in the configuration (report.failure_examples: 0)."}
    if "image" not in primary_rows:
        return {**out, "available": False,
                "reason": "The predictions carry no image paths, so the misclassified images cannot be shown; "
                          "pass an 'image' column (the preprocessed array of each row) to build_report."}
    for key, rows, ascending in (("false_positives", wrong_positive, False), ("false_negatives", wrong_negative, True)):
        for _, row in rows.sort_values("prob", ascending=ascending, kind="stable").head(k).iterrows():
            thumbnail = None if _missing(row["image"]) else _thumbnail(Path(str(row["image"])))
            out[key].append({"image_id": None if _missing(row["image_id"]) else str(row["image_id"]),
                             "hospital": row["hospital"], "role": row["role"], "label": int(row["label"]),
                             "prob": float(row["prob"]), "thumbnail": thumbnail})
    return {**out, "available": True, "reason": ""}


def _thumbnail(path: Path) -> str | None:
    """A small grey PNG data URI of a stored array (2D, or the middle slice of 3D); None when unreadable."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("report: no thumbnail for a failure example: %s", exc)
        return None
    image = np.asarray(array, dtype=np.float64)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    if image.ndim != 2 or not np.isfinite(image).all():
        log.warning("report: no thumbnail for a failure example: array of shape %s is not an image", array.shape)
        return None
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:  # stored arrays are in [0, 1]; anything else is stretched to fit
        image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    picture = Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L")
    scale = _THUMBNAIL_PX / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _warnings(metrics: dict, ctx: dict) -> list[str]:
    level = _pct(metrics["settings"]["confidence"])
    out: list[str] = []
    if metrics["intended_use"]["is_default"]:
        out.append("The intended-use statement is medtl's placeholder; replace report.intended_use with the "
                   "site's own statement before sign-off.")
    n_default = sum(item["default"] for item in metrics["limitations"]["items"])
    if n_default:
        out.append(f"{n_default} limitation(s) are medtl's placeholder text; replace report.limitations with the "
                   "site's own before sign-off.")
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

    negative = metrics["negative_transfer"]
    if negative["checked"] and negative["negative"]:
        action = ("the model trained from scratch was used instead" if negative["fallback_applied"]
                  else "the pretrained model was kept anyway")
        out.append(f"Negative transfer: {negative['message']}; {action}.")

    adapt = metrics["adaptation"]
    deployed = adapt.get("deployed") or {}
    delta = deployed.get("delta_auc_vs_comparison")
    if delta is not None and not math.isnan(delta["value"]):
        where, versus = adapt["target_hospital"], f"the fine-tuned model before adaptation ({deployed['comparison_model']})"
        if delta["value"] <= 0:
            out.append(f"At {where}, the deployed adapted model does not beat {versus}: AUC changes by "
                       f"{_fmt_ci(delta, signed=True)}.")
        elif not math.isnan(delta["ci_low"]) and delta["ci_low"] <= 0:
            out.append(f"At {where}, the deployed adapted model's AUC gain over {versus} ({delta['value']:+.3f}) is "
                       f"within bootstrap noise ({level} CI includes 0).")

    use = metrics["data_use"]
    for breach in use["breaches"]:
        out.append(f"{breach['hospital']} is called external, but {breach['stage_label']} read "
                   f"{breach['images']} of its images: its results are not those of a hospital the model never saw.")
    out += list(metrics["shortcut_audit"].get("warnings") or [])
    estimates = metrics["performance_estimates"]
    if estimates["available"] and estimates["source_validation_auc"] is not None:
        for site in estimates["sites"]:
            for row in site["estimates"]:
                warning = estimated_drop_warning(row["estimate"], estimates["source_validation_auc"],
                                                 site=site["hospital"],
                                                 source_accuracy=estimates.get("source_validation_accuracy"))
                if warning:
                    out.append(warning)
                    break  # one warning per site: the other estimate is in the section
    shift = metrics["label_shift"]
    if shift["available"] and shift["source_prevalence"] is not None:
        for site in shift["sites"]:
            if site.get("inconsistent"):
                out.append(f"{site['hospital']}: the finding's prevalence cannot be estimated without labels: "
                           f"{site['inconsistent']}.")
                continue
            estimate = site["em"] if site["em"].get("prevalence") is not None else site["bbse"]
            low, high = estimate.get("ci_low"), estimate.get("ci_high")
            if low is not None and high is not None and not low <= shift["source_prevalence"] <= high:
                out.append(f"{site['hospital']}: the finding's prevalence, estimated without labels from "
                           f"{site['images']}, is {estimate['prevalence']:.2f} [{low:.2f}–{high:.2f}] "
                           f"({estimate['method']}) against {shift['source_prevalence']:.2f} at the source: "
                           "predictive values and the accuracy at the operating point change with it "
                           "(adapt.label_shift corrects the probabilities at the target).")

    ingest = ctx["ingest"]
    accounted = _ingest_accounted(ingest)
    if accounted != ingest["files_in"]:
        out.append(f"Ingestion does not balance: {ingest['files_in']} files in, but "
                   f"{' + '.join(k.replace('_', ' ') for k in INGEST_KEYS[1:])} = {accounted}.")
    return out


# ---------------------------------------------------------------------------------------------
# figures

def _figures(preds: pd.DataFrame, metrics: dict, cfg: ReportConfig) -> dict[str, dict[str, str]]:
    primary = metrics["primary_model"]
    adapt = metrics["adaptation"]
    target = adapt["target_hospital"]
    threshold = metrics["settings"]["threshold"]
    hospital_curves = [(f"{h} ({m['role']})", preds[(preds["model"] == primary) & (preds["hospital"] == h)], m)
                       for h, m in metrics["per_hospital"].items()]
    roc_title = f"ROC of the {primary} model per hospital"
    figures = {
        "roc_hospitals": {"title": roc_title, "png": _roc_figure(hospital_curves, threshold, roc_title)},
        "calibration": {"title": f"Calibration of the {primary} model per hospital",
                        "png": _calibration_figure(hospital_curves, cfg.calibration_bins)},
        "roc_adaptation": None,
    }
    if adapt["ran"]:
        method_curves = [(method, preds[(preds["model"] == method) & (preds["hospital"] == target)], m)
                         for method, m in adapt["methods"].items()]
        adapt_title = f"ROC on {target} (target) per method"
        figures["roc_adaptation"] = {"title": adapt_title, "png": _roc_figure(method_curves, threshold, adapt_title)}
    return figures


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


def _interval(m: dict) -> dict[str, float]:
    """``{value, ci_low, ci_high}`` as floats, NaN where undefined (None after a JSON round trip)."""
    return {key: _num(m.get(key)) for key in ("value", "ci_low", "ci_high")}


def _num(value: Any) -> float:
    """A float, NaN for None (a JSON round trip turns NaN into None)."""
    return float("nan") if value is None else float(value)


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _metric_cells(m: dict, names: tuple[str, ...] = METRIC_NAMES) -> dict[str, dict[str, str]]:
    """Value and interval kept apart so the table can stack them."""
    return {name: dict(zip(("value", "ci"), _ci_parts(m[name]))) for name in names}


def _delta_cell(name: str, m: dict) -> dict[str, str]:
    if name == BASELINE_MODEL:
        return {"value": "reference", "ci": ""}
    delta = m.get("delta_auc_vs_baseline")
    if delta is None:
        return {"value": "—", "ci": ""}
    return dict(zip(("value", "ci"), _ci_parts(delta, signed=True)))


def _render_html(metrics: dict, ctx: dict, *, pdf: bool) -> str:
    """The report page; ``pdf=True`` swaps in a stylesheet and layout that xhtml2pdf can draw."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES),
                             autoescape=jinja2.select_autoescape(["html"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    adapt = metrics["adaptation"]
    ingest = ctx["ingest"]
    ranking_columns = list(dict.fromkeys(["rank", "backbone", "logme", "linear_probe_auc",
                                          *(k for row in ctx["backbone_ranking"] for k in row
                                            if k != "chosen" and k not in _TARGET_RANKING_COLUMNS)]))
    target_columns = ["rank", "backbone", *(k for k in _TARGET_RANKING_COLUMNS
                                            if any(k in row for row in ctx["backbone_ranking"]))]
    limitations = metrics["limitations"]["items"]
    view = {
        "pdf": pdf,
        "fonts": _pdf_fonts() if pdf else None,
        "sections": _sections(metrics),
        "title": ctx["title"],
        "generated_at": datetime.fromisoformat(metrics["generated_at"]).strftime("%Y-%m-%d %H:%M UTC"),
        "primary_model": metrics["primary_model"],
        "threshold": f"{metrics['settings']['threshold']:.3f}",
        "threshold_source": ctx["threshold_source"],
        "level": _pct(metrics["settings"]["confidence"]),
        "n_bootstrap": metrics["settings"]["n_bootstrap"],
        "calibration_bins": metrics["settings"]["calibration_bins"],
        "summary": metrics["summary"]["paragraphs"],
        "headline": _headline(metrics),
        "warnings": metrics["warnings"],
        "intended_use": metrics["intended_use"],
        "cohort": [_site_row(row) for row in metrics["data_provenance"]["sites"]],
        "ingest": {k: _fmt_value(ingest[k]) for k in INGEST_KEYS},
        "ingest_balances": _ingest_accounted(ingest) == ingest["files_in"],
        "quarantine_reasons": sorted((ingest.get("quarantine_reasons") or {}).items(), key=lambda kv: -kv[1]),
        "provenance": _provenance_rows(metrics["data_provenance"]),
        "ranking_columns": [_COLUMN_TITLES.get(c, c.replace("_", " ").capitalize()) for c in ranking_columns],
        "ranking": [{"cells": [_fmt_value(row.get(c)) for c in ranking_columns], "chosen": bool(row["chosen"])}
                    for row in sorted(ctx["backbone_ranking"], key=lambda r: r["rank"])],
        "target_ranking_columns": ([_COLUMN_TITLES.get(c, c) for c in target_columns]
                                   if len(target_columns) > 2 else []),
        "target_ranking": [{"cells": [_fmt_value(row.get(c)) for c in target_columns], "chosen": bool(row["chosen"])}
                           for row in sorted(ctx["backbone_ranking"], key=lambda r: r["rank"])],
        "finetune": [(k, _fmt_value(v)) for k, v in metrics["model_development"]["finetune"].items()],
        "negative_transfer": _negative_transfer_view(metrics["negative_transfer"]),
        "roles": _ROLE_HELP,
        "hospitals": [{"hospital": h, "role": m["role"], "n": m["n"], "n_patients": m["n_patients"],
                       "n_positive": m["n_positive"], **_metric_cells(m)}
                      for h, m in metrics["per_hospital"].items()],
        "operating": [{**row, **_metric_cells(row, ("sensitivity", "specificity", "ppv", "npv"))}
                      for row in metrics["operating_point"]["per_site"]],
        "operating_lines": [_operating_line(row) for row in metrics["operating_point"]["per_site"]],
        "subgroups": [{**a, "groups": [{**g, **_metric_cells(g, ("auc", "sensitivity", "specificity"))}
                                       for g in a["groups"]]} for a in metrics["subgroups"]["attributes"]],
        "shift": _shift_view(metrics["shift_diagnostics"]),
        "target": adapt["target_hospital"],
        "baseline_model": BASELINE_MODEL,
        "adapt": {"ran": adapt["ran"], "reason": adapt.get("reason"),
                  "upper_bound": (adapt.get("upper_bound") or {}).get("method"),
                  "deployed": None if not adapt.get("deployed") else {
                      "candidate": adapt["deployed"].get("candidate") or "", "n": adapt["deployed"]["n"],
                      "n_patients": adapt["deployed"]["n_patients"], **_metric_cells(adapt["deployed"]),
                      "delta": _delta_cell("", {"delta_auc_vs_baseline": adapt["deployed"].get(
                          "delta_auc_vs_comparison")}),
                      "comparison": adapt["deployed"].get("comparison_model")},
                  "before": None if not adapt.get("before_adaptation") else {
                      "model": adapt["before_adaptation"]["model"], "n": adapt["before_adaptation"]["n"],
                      "n_patients": adapt["before_adaptation"]["n_patients"],
                      **_metric_cells(adapt["before_adaptation"]),
                      "delta": _delta_cell("", adapt["before_adaptation"])}},
        "methods": [{"method": name, "n": m["n"], "n_patients": m["n_patients"], **_metric_cells(m),
                     "delta": _delta_cell(name, m),
                     "upper_bound": name == (adapt.get("upper_bound") or {}).get("method")}
                    for name, m in adapt["methods"].items()],
        "deployed": _deployed_view(metrics["deployed_model"]),
        "data_use": _data_use_view(metrics["data_use"]),
        "recalibration": _recalibration_view(metrics["recalibration"]),
        "label_shift": _label_shift_view(metrics["label_shift"]),
        "shortcuts": _shortcut_view(metrics["shortcut_audit"]),
        "expected": _expected_view(metrics["performance_estimates"]),
        "selection_block": _selection_view(metrics["model_development"]["backbone_selection"]),
        "adaptation_notes": _as_list(ctx["adaptation"].get("notes")),
        "selection": [{**row, "target_auc": _fmt_value(row.get("target_auc")),
                       "auc_gap_to_oracle": _fmt_value(row.get("auc_gap_to_oracle")),
                       "candidate": row.get("candidate") or "none (no candidate has this score)"}
                      for row in adapt["selection"]],
        "loho": _loho_view(metrics.get("leave_one_hospital_out")),
        "failures": _failures_view(metrics["failure_examples"]),
        "checks": {"min_auc_ci_low": f"{MIN_AUC_CI_LOW:.2f}", "max_ece": f"{MAX_ECE:.2f}",
                   "min_per_class": MIN_PER_CLASS},
        "metric_notes": _metric_notes(metrics),
        "limitations": limitations,
        "limitations_default": any(item["default"] for item in limitations),
        "tripod": metrics["tripod_ai"]["items"],
        "fig": {name: figure["png"] if figure else None for name, figure in metrics["figures"].items()},
    }
    return env.get_template("report.html").render(**view)


def _deployed_view(block: dict) -> dict:
    """Key-value rows that say what exactly is deployed and how it is used."""
    origin, calibration, shift = block["origin"], block["calibration"], block["label_shift"]
    rows = [("model", origin["description"]), ("file", block.get("file") or "—"),
            ("SHA-256", block.get("sha256") or "—"), ("starts from", block.get("backbone") or "—"),
            ("made by", f"the {origin['stage']} stage ({origin['file']})"),
            ("operating threshold", f"{block['threshold']:.3f}, {block['threshold_source']}")]
    if calibration["method"] == "none":
        rows.append(("calibration", "none: the network's own probabilities (report.recalibrate: none)"))
    else:
        rows.append(("calibration", f"{calibration['method']} on the {calibration['fitted_on']}: temperature "
                                    f"{calibration['temperature']:.3f}, negative log-likelihood "
                                    f"{calibration['nll_before']:.3f} → {calibration['nll_after']:.3f}"))
    if shift.get("applied"):
        rows.append(("prevalence correction", shift["rule"]))
    else:
        rows.append(("prevalence correction", shift.get("reason") or f"none (adapt.label_shift: {shift['method']})"))
    rows += [("note", note) for note in origin.get("notes") or []]
    if shift.get("note"):
        rows.append(("note", shift["note"]))
    return {"rows": rows, "comparison": block.get("comparison_model")}


def _data_use_view(use: dict) -> dict:
    stages = list(use["stages"].items())
    rows = [{"hospital": row["hospital"], "role": row["role"], "images": _fmt_value(row["images"]),
             "cells": [("not run" if row["read"][key] is None else _fmt_value(row["read"][key]),
                        row["role"] == "external" and bool(row["read"][key]) and key not in ("evaluation", "loho"))
                       for key, _ in stages]}
            for row in use["hospitals"]]
    return {"stages": [stage.get("heading", stage["label"]) for _, stage in stages], "rows": rows,
            "legend": "; ".join(f"{stage.get('heading', stage['label'])}: {stage['label']}" for _, stage in stages
                                if stage.get("heading", stage["label"]) != stage["label"]),
            "notes": use["notes"], "external_unseen": use["external_unseen"]}


def _recalibration_view(block: dict) -> dict:
    return {"available": block["available"], "reason": block.get("reason", ""),
            "rows": [{"hospital": r["hospital"], "role": r["role"],
                      **{k: dict(zip(("value", "ci"), _ci_parts(r[k])))
                         for k in ("ece_network", "ece_deployed", "brier_network", "brier_deployed")}}
                     for r in block["sites"]]}


def _prevalence_cell(estimate: dict) -> dict[str, str]:
    if estimate.get("prevalence") is None:
        return {"value": "n/a", "ci": estimate.get("reason", "")[:120]}
    return {"value": f"{estimate['prevalence'] * 100:.1f} %",
            "ci": f"[{_pct_or_na(estimate.get('ci_low'))}–{_pct_or_na(estimate.get('ci_high'))}]"}


def _label_shift_view(block: dict) -> dict:
    if not block["available"]:
        return {"available": False, "reason": block["reason"]}
    return {"available": True, "source": _pct_or_na(block["source_prevalence"]),
            "correction": block["correction"], "references": "; ".join(block["references"]),
            "rows": [{"hospital": r["hospital"], "role": r["role"], "images": r["images"],
                      "bbse": _prevalence_cell(r["bbse"]), "em": _prevalence_cell(r["em"]),
                      "inconsistent": r.get("inconsistent") or "",
                      "true": "—" if r["true_prevalence"] is None else
                      f"{r['true_prevalence'] * 100:.1f} % (n = {r['true_prevalence_n']})"} for r in block["sites"]]}


def _shortcut_view(audit: dict) -> dict:
    if not audit["available"]:
        return {"available": False, "reason": audit["reason"]}
    rows = []
    for row in audit["label"]:
        fields = ", ".join(f"{f['field']} {_fmt_value(f['auc'])}" for f in (row.get("field_auc") or [])[:3])
        rows.append({"hospital": row["hospital"], "n": _fmt_value(row.get("n")),
                     "auc": dict(zip(("value", "ci"), _ci_parts(_interval(row["auc"])))) if row.get("auc") else
                     {"value": "n/a", "ci": ""}, "predictable": bool(row.get("predictable")),
                     "fields": fields or (row.get("reason") or "—")})
    hospital = audit.get("hospital") or {}
    return {"available": True, "rows": rows, "threshold": f"{audit['threshold']:.2f}",
            "hospital_auc": (_fmt_ci(_interval(hospital["auc"])) if hospital.get("auc") else
                             hospital.get("reason", "n/a")),
            "hospital_fields": ", ".join(f["field"] for f in (hospital.get("field_auc") or [])[:3]),
            "fields_used": ", ".join(hospital.get("fields_used") or []), "reference": audit["reference"]}


def _expected_view(block: dict) -> dict:
    if not block["available"]:
        return {"available": False, "reason": block["reason"]}
    rows = []
    for site in block["sites"]:
        for row in site["estimates"]:
            rows.append({"hospital": site["hospital"], "role": site["role"], "images": site["images"],
                         "method": _ESTIMATE_NAMES[row["method"]],
                         "auc": dict(zip(("value", "ci"), _ci_parts(row["auc"]))),
                         "accuracy": dict(zip(("value", "ci"), _ci_parts(row["accuracy"]))),
                         "measured_auc": (dict(zip(("value", "ci"), _ci_parts(site["measured_auc"])))
                                          if site["measured_auc"] else {"value": "—", "ci": ""}),
                         "measured_accuracy": (dict(zip(("value", "ci"), _ci_parts(site["measured_accuracy"])))
                                               if site["measured_accuracy"] else {"value": "—", "ci": ""})})
    source = block["source_validation_auc"]
    return {"available": True, "rows": rows, "source_auc": "n/a" if source is None else f"{source:.3f}",
            "references": "; ".join(block["references"]),
            "notes": [f"{s['hospital']}: {s['note']}" for s in block["sites"] if s.get("note")]}


def _selection_view(block: dict) -> dict:
    target = block.get("target_aware") or None
    return {"rank_by": block.get("rank_by") or "logme", "target_aware": target}


def _site_row(row: dict) -> dict:
    sha = row["content_sha256"]
    dates = row["study_dates"]
    return {**row, **{k: _fmt_value(row[k]) for k in ("n_images", "n_patients", "n_labeled")},
            "prevalence": "—" if row["prevalence"] is None else f"{row['prevalence'] * 100:.1f} %",
            "content_sha256": sha or _NOT_RECORDED, "content_short": f"{sha[:12]}…" if sha else _NOT_RECORDED,
            "study_dates": _NOT_RECORDED if _missing(dates) else str(dates),
            "study_dates_recorded": not _missing(dates)}


def _provenance_rows(provenance: dict) -> list[tuple[str, str]]:
    code = provenance["code"]
    rows = [("medtl version", str(code["medtl_version"])),
            ("git commit", code["git_commit"] or "not available (medtl not run from a git checkout)")]
    rows += [(k.replace("_", " "), _fmt_value(v)) for k, v in provenance.items()
             if k not in ("code", "sites", "ingest")]
    return rows


def _negative_transfer_view(block: dict) -> dict:
    message = str(block["message"]).strip()
    view = {"checked": block["checked"], "negative": bool(block.get("negative")),
            "message": message if message.endswith(".") else message + ".",
            "fallback": "", "transfer": "—", "scratch": "—", "delta": "—"}
    if not block["checked"]:
        return view
    for key, name, spec in (("transfer", "transfer_val_auc", ".3f"), ("scratch", "scratch_val_auc", ".3f"),
                            ("delta", "delta", "+.3f")):
        value = block.get(name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            view[key] = format(float(value), spec)
    if block["negative"]:
        view["fallback"] = ("The model trained from scratch was used instead." if block["fallback_applied"]
                            else "The pretrained model was kept.")
    return view


def _operating_line(row: dict) -> str:
    with_finding, without = row["tp"] + row["fn"], row["tn"] + row["fp"]
    parts = []
    if with_finding:
        parts.append(f"of {with_finding} images with the finding, {row['tp']} were flagged "
                     f"(sensitivity {_fmt_ci(row['sensitivity'])})")
    else:
        parts.append("no images with the finding")
    if without:
        parts.append(f"of {without} without it, {row['fp']} were flagged wrongly "
                     f"(specificity {_fmt_ci(row['specificity'])})")
    else:
        parts.append("no images without the finding")
    return f"{row['hospital']}: " + "; ".join(parts) + "."


def _signed(value: float, spec: str) -> str:
    """``format(value, spec)`` with a true minus sign (U+2212) instead of a hyphen."""
    return format(value, spec).replace("-", "\u2212")


def _shift_verdict(pad: float) -> str:
    if math.isnan(pad):
        return "not computed"
    if pad < 0.5:
        return "similar"
    return "noticeably different" if pad < 1.5 else "clearly different"


def _shift_view(shift: dict) -> dict:
    rows, notes = [], []
    for c in shift["comparisons"]:
        pad, balanced = _num(c["proxy_a_distance"]), _num(c["domain_balanced_accuracy"])
        mmd, p_value = _num(c["mmd2"]), _num(c["mmd_p_value"])
        large = [d for d in c["differences"] if abs(_num(d["effect_size"])) >= 0.5][:3]
        # non-breaking spaces keep "(d = +1.2)" on one line in a narrow column; a true minus sign reads better
        differences = ", ".join(f"{d['feature']} {'higher' if d['effect_size'] > 0 else 'lower'} "
                                f"(d\u00a0=\u00a0{_signed(d['effect_size'], '+.1f')})" for d in large)
        rows.append({"site": c["site"], "n_site": c["n_site"], "verdict": _shift_verdict(pad),
                     "balanced": "n/a" if math.isnan(balanced) else f"{balanced * 100:.0f} %",
                     "pad": "n/a" if math.isnan(pad) else f"{pad:.2f}",
                     "mmd": "n/a" if math.isnan(mmd) else (f"{mmd:.3f}" + ("" if math.isnan(p_value)
                                                                         else f" (p = {p_value:.3f})")),
                     "differences": differences or "no property differs by half a standard deviation or more"})
        notes += [f"{c['site']}: {note}" for note in c.get("notes") or []]
    reference = shift["reference"]
    names = list(shift["features"])
    return {"rows": rows, "notes": notes, "n_reference": shift["n_reference"],
            "reference": ", ".join(reference) if isinstance(reference, (list, tuple)) else str(reference),
            "n_features": len(names), "feature_list": ", ".join(names),
            "cv_folds": shift.get("cv_folds", "k"), "n_permutations": shift.get("n_permutations", "several")}


def _loho_view(section: dict | None) -> dict | None:
    """Table cells and one plain sentence per held-out hospital; None without the section."""
    if section is None:
        return None
    model, rows = f"the model this report validates ({section['comparison_model']})", []
    for row in section["held_out"]:
        trained_on = ", ".join(row["train_hospitals"])
        comparison = row["comparison"]
        result = (f"reached AUC {_fmt_ci(row['auc'])}" if not math.isnan(row["auc"]["value"])
                  else "has no AUC there (its labeled images are all of one class)")
        line = (f"{row['hospital']}: a model trained on {trained_on} ({_fmt_value(row['train_images'])} images) and "
                f"tested on {_fmt_value(row['test_images'])} images from {row['hospital']}, which it never saw, "
                f"{result}")
        if comparison is None:
            line += f"; there is no result of {model} there to compare."
        elif comparison["trained_on_this_hospital"]:
            line += (f"; {model}, trained on this hospital's own patients, reached {_fmt_ci(comparison['auc'])} on "
                     "its held-out patients.")
        else:
            line += f"; {model}, trained without this hospital too, reached {_fmt_ci(comparison['auc'])}."
        rows.append({"hospital": row["hospital"], "role": row["role"] or "not in the cohort",
                     "trained_on": trained_on, "train_images": _fmt_value(row["train_images"]),
                     "val_images": _fmt_value(row["val_images"]), "test_images": _fmt_value(row["test_images"]),
                     "auc": dict(zip(("value", "ci"), _ci_parts(row["auc"]))),
                     "comparison": (dict(zip(("value", "ci"), _ci_parts(comparison["auc"]))) if comparison
                                    else {"value": "—", "ci": ""}),
                     "trained_on_it": bool(comparison and comparison["trained_on_this_hospital"]), "line": line})
    return {"backbone": section["backbone"], "strategy": section["strategy"], "model": model,
            "level": _pct(section["confidence"]), "rows": rows, "notes": section["notes"]}


def _failures_view(failures: dict) -> dict:
    groups = []
    for key, title, total in (("false_positives", "Most confident false positives", failures["n_false_positives"]),
                              ("false_negatives", "Most confident false negatives", failures["n_false_negatives"])):
        examples = [{**ex, "prob": f"{ex['prob']:.3f}", "image_id": ex["image_id"] or "no id",
                     "short_id": _short_id(ex["image_id"])} for ex in failures[key]]
        groups.append({"title": title, "total": total, "shown": len(examples), "examples": examples})
    return {"available": failures["available"], "reason": failures["reason"], "groups": groups}


def _short_id(image_id: str | None) -> str:
    """The tail of a long id (DICOM UIDs differ at the end); the full id is in report.json."""
    if not image_id:
        return "no id"
    return image_id if len(image_id) <= 20 else "…" + image_id[-18:]


def _pdf_fonts() -> dict[str, str] | None:
    """DejaVu Sans from matplotlib's own data folder: always installed with medtl, and it has Δ, −, ≥."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = {"regular": folder / "DejaVuSans.ttf", "bold": folder / "DejaVuSans-Bold.ttf",
             "italic": folder / "DejaVuSans-Oblique.ttf"}
    return {k: str(v) for k, v in fonts.items()} if all(v.is_file() for v in fonts.values()) else None


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _metric_notes(metrics: dict) -> list[str]:
    adapt = metrics["adaptation"]
    scopes = [(f"{metrics['primary_model']} on {h}", m) for h, m in metrics["per_hospital"].items()]
    scopes += [(f"{name} on {adapt['target_hospital']}", m) for name, m in adapt["methods"].items()]
    if adapt.get("deployed"):
        scopes.append((f"{metrics['primary_model']} on {adapt['target_hospital']} (adaptation table)",
                       adapt["deployed"]))
    scopes += [(f"{metrics['primary_model']}, subgroup {g['group']}", g)
               for a in metrics["subgroups"]["attributes"] if a["attribute"] != "hospital" for g in a["groups"]]
    return [f"{scope}: {note}" for scope, m in scopes for note in m["notes"]]


def _plain_summary(metrics: dict) -> list[str]:
    level = _pct(metrics["settings"]["confidence"])
    per = metrics["per_hospital"]
    adapt = metrics["adaptation"]
    roles = {r: [h for h, m in per.items() if m["role"] == r] for r in ROLES}
    n_patients = sum(m["n_patients"] for m in per.values())
    deployed_model = metrics["deployed_model"]
    paragraphs = [
        f"This report checks how well the deployed model ({deployed_model['origin']['description']}; the file "
        f"{deployed_model['file'] or 'named in “Deployed model”'}) detects the finding on {n_patients:,} patients "
        f"from {len(per)} hospital{'s' if len(per) != 1 else ''}: "
        + "; ".join(f"{', '.join(hs)} ({role})" for role, hs in roles.items() if hs) + ". "
        f"Every number describes that model and carries a {level} confidence interval from resampling patients.",
    ]
    site_lines = [f"{h} ({m['role']}) AUC {_fmt_ci(m['auc'])}" for h, m in per.items()]
    paragraphs.append("Discrimination (AUC; 0.5 = chance, 1.0 = perfect): " + ", ".join(site_lines) + ".")
    deployed = adapt.get("deployed")
    if adapt["ran"] and deployed is not None and deployed.get("comparison_auc") is not None:
        paragraphs.append(
            f"At the target hospital {adapt['target_hospital']}, the deployed model was adapted and chosen without "
            f"its labels; it reaches AUC {_fmt_ci(deployed['auc'])}, against {_fmt_ci(deployed['comparison_auc'])} "
            f"for the fine-tuned model before adaptation (difference "
            f"{_fmt_delta(deployed.get('delta_auc_vs_comparison'))}). Numbers chosen with the target's labels "
            "appear only in “Adaptation”, as upper bounds.")
    elif not adapt["ran"]:
        paragraphs.append(f"No adaptation: {adapt['reason']}.")
    shift = metrics["label_shift"]
    target_shift = next((site for site in shift["sites"] if site["role"] == "target"), None)
    if target_shift is not None and target_shift.get("inconsistent"):
        paragraphs.append(f"The finding's prevalence at {target_shift['hospital']} cannot be estimated without its "
                          f"labels ({target_shift['inconsistent']}); no prevalence correction is applied.")
    elif target_shift is not None and target_shift["em"].get("prevalence") is not None:
        em = target_shift["em"]
        correction = deployed_model["label_shift"]
        paragraphs.append(
            f"Estimated without labels, the finding's prevalence at {target_shift['hospital']} is "
            f"{em['prevalence'] * 100:.0f} % [{_pct_or_na(em.get('ci_low'))}–{_pct_or_na(em.get('ci_high'))}] "
            f"against {shift['source_prevalence'] * 100:.0f} % at the source"
            + (f"; the deployed probabilities there are corrected to it ({correction['method']})."
               if correction.get("applied") else "; the deployed probabilities are not corrected for it "
               "(adapt.label_shift: none)."))
    estimates = metrics["performance_estimates"]
    expected = [f"{site['hospital']} " + ", ".join(_expected_figure(row) for row in site["estimates"])
                for site in estimates["sites"] if site["role"] != "source" and site["estimates"]]
    if expected:
        paragraphs.append("Expected without any label of those hospitals (an estimate, checked against the "
                          "measured values in “Performance expected without labels”): " + ", ".join(expected) + ".")
    audit = metrics["shortcut_audit"]
    predictable = [row["hospital"] for row in audit.get("label") or [] if row.get("predictable")]
    if predictable:
        paragraphs.append("At " + ", ".join(predictable) + ", the label can be predicted from the acquisition alone "
                          "(image size, view, device…): see “Shortcut and confounder audit”.")
    paragraphs.append(
        f"Sensitivity and specificity are given at one fixed threshold, {metrics['settings']['threshold']:.3f}, "
        f"chosen on {metrics['settings']['threshold_source']} and applied unchanged to every hospital; it was "
        "not tuned on target or external data.")
    comparisons = [c for c in metrics["shift_diagnostics"]["comparisons"]
                   if not math.isnan(_num(c["proxy_a_distance"]))]
    if comparisons:
        most = max(comparisons, key=lambda c: _num(c["proxy_a_distance"]))
        paragraphs.append(
            f"Images from {most['site']} differ most from the training hospital's "
            f"({_shift_verdict(_num(most['proxy_a_distance']))}: a simple classifier tells them apart "
            f"{_num(most['domain_balanced_accuracy']) * 100:.0f} % of the time, where 50 % would mean no "
            "difference); see “Shift between hospitals”.")
    loho = metrics.get("leave_one_hospital_out")
    if loho is not None:
        paragraphs.append(
            "How the model does at a hospital it never saw (leave-one-hospital-out: trained on all the other "
            "hospitals, tested on the one left out): "
            + ", ".join(f"{row['hospital']} AUC {_fmt_ci(row['auc'])}" for row in loho["held_out"])
            + f" ({_pct(loho['confidence'])} CIs); see “Leave-one-hospital-out”.")
    return paragraphs


def _headline(metrics: dict) -> list[dict[str, str]]:
    """One card per hospital: the deployed model's AUC there (nothing chosen on what it measures)."""
    return [{"label": f"AUC · {h}", "sub": m["role"], "value": _fmt_value(m["auc"]["value"]),
             "ci": _ci_parts(m["auc"])[1] or "n/a"} for h, m in metrics["per_hospital"].items()]


_ESTIMATE_NAMES = {"atc": "ATC", "agreement": "agreement of the adaptation candidates"}


def _pct_or_na(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value * 100:.0f} %"


def _md(text: Any) -> str:
    """Escape the one character that breaks a markdown table cell."""
    return str(text).replace("|", "\\|")


def _summary_markdown(metrics: dict) -> str:
    level = _pct(metrics["settings"]["confidence"])
    adapt = metrics["adaptation"]
    deployed = metrics["deployed_model"]
    lines = [
        f"## {_md(metrics['title'])}",
        "",
        f"Deployed model: **{_md(deployed['origin']['description'])}** (`{_md(deployed['file'])}`); threshold "
        f"{metrics['settings']['threshold']:.3f} (chosen on {_md(metrics['settings']['threshold_source'])}); "
        f"{level} patient-bootstrap CIs.",
        "",
        "| Hospital | Role | Images (patients) | AUC | Sensitivity | Specificity | PPV | NPV | ECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h, m in metrics["per_hospital"].items():
        lines.append(f"| {_md(h)} | {m['role']} | {m['n']} ({m['n_patients']}) | {_fmt_ci(m['auc'])} | "
                     f"{_fmt_ci(m['sensitivity'])} | {_fmt_ci(m['specificity'])} | {_fmt_ci(m['ppv'])} | "
                     f"{_fmt_ci(m['npv'])} | {_fmt_ci(m['ece'])} |")
    if adapt["ran"]:
        lines += ["", f"**Adaptation on {_md(adapt['target_hospital'])}** (the upper bound is chosen with the "
                  "target's labels)", "", f"| Model | AUC | ΔAUC vs {BASELINE_MODEL} |", "|---|---|---|"]
        if adapt["deployed"] is not None:
            lines.append(f"| deployed ({_md(adapt['deployed'].get('candidate') or '')}) | "
                         f"{_fmt_ci(adapt['deployed']['auc'])} | — |")
        upper = (adapt["upper_bound"] or {}).get("method")
        for name, m in adapt["methods"].items():
            delta = "reference" if name == BASELINE_MODEL else _fmt_delta(m.get("delta_auc_vs_baseline"))
            marker = " (upper bound: uses target labels)" if name == upper else ""
            lines.append(f"| {_md(name)}{marker} | {_fmt_ci(m['auc'])} | {delta} |")
    else:
        lines += ["", f"No adaptation: {_md(adapt['reason'])}."]
    loho = metrics.get("leave_one_hospital_out")
    if loho is not None:
        lines += ["", "**Leave-one-hospital-out** (trained on the other hospitals, tested on the one left out)", "",
                  f"| Held-out hospital | Trained on | AUC | {_md(loho['comparison_model'])} AUC there |",
                  "|---|---|---|---|"]
        for row in loho["held_out"]:
            comparison = "—" if row["comparison"] is None else _fmt_ci(row["comparison"]["auc"])
            lines.append(f"| {_md(row['hospital'])} | {_md(', '.join(row['train_hospitals']))} | "
                         f"{_fmt_ci(row['auc'])} | {comparison} |")
    if metrics["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {_md(w)}" for w in metrics["warnings"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# output

def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN / inf → None; values JSON cannot hold are stored as their string."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
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


def _write_atomic(path: Path, text: str | bytes) -> None:
    """Readers see the old file or the new one, never a half-written report."""
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text))


def _write_pdf(pdf_html: str, html_path: Path, pdf_path: Path) -> str | None:
    """Write report.pdf with the first renderer that works; never raises.

    xhtml2pdf first: pure Python (ReportLab underneath), so it works offline on a cluster node without a
    browser. Headless Chromium prints the screen HTML when xhtml2pdf is missing or fails.

    Returns:
        ``"xhtml2pdf"``, ``"chromium"``, or None when no PDF was written (with a logged warning).
    """
    reasons = []
    try:
        _write_atomic(pdf_path, _xhtml2pdf(pdf_html))
        return "xhtml2pdf"
    except ImportError:
        reasons.append("xhtml2pdf is not installed (pip install xhtml2pdf)")
    except Exception as exc:  # noqa: BLE001 - a PDF renderer must never take the report down with it
        reasons.append(f"xhtml2pdf failed: {exc}")
    chromium = _chromium()
    if chromium is not None:
        try:
            _write_atomic(pdf_path, _chromium_pdf(chromium, html_path))
            return "chromium"
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"Chromium failed: {exc}")
    else:
        reasons.append("no Chromium at /usr/bin/chromium or on PATH")
    log.warning("report: PDF skipped (%s); report.html and report.json were written. Install xhtml2pdf "
                "(pip install xhtml2pdf) or Chromium to get report.pdf.", "; ".join(reasons))
    return None


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """xhtml2pdf logs every CSS property it does not implement; the PDF stylesheet avoids the ones that matter."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _xhtml2pdf(html: str) -> bytes:
    from xhtml2pdf import pisa

    buf = io.BytesIO()
    with _quiet("xhtml2pdf"):
        status = pisa.CreatePDF(html, dest=buf, encoding="utf-8")
    if status.err:
        raise RuntimeError(f"{status.err} error(s) while drawing the PDF")
    return buf.getvalue()


def _chromium() -> str | None:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _chromium_pdf(chromium: str, html_path: Path) -> bytes:
    with tempfile.TemporaryDirectory(prefix="medtl-chromium-") as tmp:
        out = Path(tmp) / "report.pdf"
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp}/profile", "--no-pdf-header-footer", f"--print-to-pdf={out}",
                   html_path.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            raise RuntimeError(f"exit code {done.returncode}: {done.stderr.strip()[-300:]}")
        return out.read_bytes()
