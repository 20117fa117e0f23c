"""Evaluation: per-hospital metrics with patient-level bootstrap CIs, and the validation report."""

from medtl.evaluate.metrics import (
    CalibrationCurve,
    auc_difference,
    binary_metrics,
    calibration_curve,
    expected_calibration_error,
    youden_threshold,
)
from medtl.evaluate.report import ReportResult, build_report

__all__ = [
    "CalibrationCurve",
    "ReportResult",
    "auc_difference",
    "binary_metrics",
    "build_report",
    "calibration_curve",
    "expected_calibration_error",
    "youden_threshold",
]
