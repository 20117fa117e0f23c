"""Evaluation: per-hospital metrics with patient-level bootstrap CIs, calibration, the shortcut audit, performance
estimated without labels, and the validation report."""

from medtl.evaluate.metrics import (
    CalibrationCurve,
    auc_difference,
    binary_metrics,
    calibration_curve,
    expected_calibration_error,
    youden_threshold,
)
from medtl.evaluate.calibration import TemperatureScaling
from medtl.evaluate.label_free import AgreementEstimator, ATCEstimator, expected_auc
from medtl.evaluate.report import ReportResult, build_report
from medtl.evaluate.shortcut import audit_hospital, audit_label, shortcut_audit

__all__ = [
    "ATCEstimator",
    "AgreementEstimator",
    "CalibrationCurve",
    "ReportResult",
    "TemperatureScaling",
    "audit_hospital",
    "audit_label",
    "auc_difference",
    "binary_metrics",
    "build_report",
    "calibration_curve",
    "expected_auc",
    "expected_calibration_error",
    "shortcut_audit",
    "youden_threshold",
]
