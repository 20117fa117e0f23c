"""Acquisition shortcuts: can the label, or the hospital, be read off how an image was acquired?

A classifier learns whatever separates the classes in its training images, and the acquisition often does. In the
paediatric pneumonia collection that PneumoniaMNIST was cut from (Kermany et al., Cell 2018), pneumonia images
are smaller and wider than normal ones at native resolution: width, height and aspect ratio alone predict the
label with AUC 0.925 (logistic regression, 5-fold grouped by patient). Zech et al. (2018) showed that pneumonia
CNNs identify the hospital a radiograph comes from and exploit its prevalence (the hospital alone predicted the
label with AUC 0.861), and generalised worse to other hospitals. A model that reads the acquisition can look good
in internal validation and fail where the acquisition differs.

Two audits answer from the manifest alone (no image, no model, no torch), using the acquisition fields ingestion
records before resizing (:data:`ACQUISITION_FIELDS`):

* :func:`audit_label` — *within one hospital*, how well a logistic regression predicts the label from the
  acquisition fields: out-of-fold probabilities from cross-validation grouped by patient (no patient's images on
  both sides of a split), their AUC with a patient-level bootstrap CI
  (:func:`medtl.evaluate.metrics.binary_metrics`), and which fields carry it: per field, the AUC of the same
  cross-validation with that field alone (not a permutation importance: a field alone says what a reviewer can
  check, e.g. "the positives have smaller matrices", and correlated fields such as rows and aspect ratio do not
  hide each other). ``predictable`` when the AUC reaches :data:`LABEL_SHORTCUT_AUC`.
* :func:`audit_hospital` — *across hospitals*, the same machinery predicting the hospital (one-vs-rest macro AUC
  for three or more); with prevalences that differ between hospitals this is Zech et al.'s failure mode for a
  model trained on images pooled from several sites.

:func:`shortcut_audit` runs both over a manifest and writes plain-language warnings for the validation report.

Interpretation. An AUC near 0.5 means the recorded acquisition carries no information about the target; it does
not rule out shortcuts the manifest does not record (burned-in markers, collimation, noise texture: see
:mod:`medtl.evaluate.shift` for image statistics). A high AUC does not prove that a model uses the shortcut,
only that one is there for it to learn: check that images with and without the finding were acquired alike, or
evaluate within acquisition strata. Under cross-validation, fields that carry no information give an AUC a little
*below* 0.5 (about 0.35–0.5 at a hundred images: a training fold's class difference in a noise field is, by
construction, the opposite of its test fold's), which means "no information", not an inverted shortcut.

References:
    Zech JR, Badgeley MA, Liu M, Costa AB, Titano JJ, Oermann EK. "Variable generalization performance of a deep
    learning model to detect pneumonia in chest radiographs: A cross-sectional study." PLOS Medicine 15(11):
    e1002683, 2018.

    Kermany DS, Goldbaum M, et al. "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep
    Learning." Cell 172(5): 1122-1131, 2018 (the paediatric chest radiographs behind PneumoniaMNIST).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy.stats import chi2_contingency
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from medtl.evaluate.metrics import (_blocks, _group_codes, _group_weights, _percentile_ci, _weighted_auc,
                                    binary_metrics)

ACQUISITION_FIELDS: dict[str, str] = {
    "rows": "numeric",  # original matrix height, before resizing
    "columns": "numeric",  # original matrix width
    "aspect_ratio": "numeric",  # derived: columns / rows
    "pixel_spacing_mm": "numeric",
    "bits_stored": "numeric",  # 0 in the manifest = not recorded
    "photometric": "categorical",
    "view_position": "categorical",
    "body_part": "categorical",
    "vendor": "categorical",
    "model": "categorical",
    "sex": "categorical",  # only where de-identification keeps it (ingest.deid.retain_patient_characteristics)
    "age": "numeric",  # likewise
}
"""Manifest field → ``"numeric"`` or ``"categorical"``: what the audits may read (``aspect_ratio`` is derived)."""

FIELD_DESCRIPTIONS: dict[str, str] = {
    "rows": "image height in pixels", "columns": "image width in pixels", "aspect_ratio": "width / height",
    "pixel_spacing_mm": "pixel spacing", "bits_stored": "detector bit depth",
    "photometric": "photometric interpretation", "view_position": "view, e.g. PA or AP",
    "body_part": "body part examined", "vendor": "device manufacturer", "model": "device model",
    "sex": "patient sex", "age": "patient age",
}
"""Plain words for each of :data:`ACQUISITION_FIELDS`, for the warnings."""

LABEL_SHORTCUT_AUC = 0.70
"""Out-of-fold AUC from which the label (or the hospital) counts as predictable from the acquisition. 0.70 is the
usual floor of "acceptable discrimination" (Hosmer & Lemeshow): a shortcut this strong is there for a model to
learn, and well below the 0.925 of the native-resolution pneumonia collection and the 0.861 of Zech et al."""

PREVALENCE_DIFFERENCE_P = 0.05
"""Significance level of the chi-square test of independence of label and hospital ("prevalences differ")."""

MIN_IMAGES = 10
"""Fewer images than this and an audit reports a reason instead of an AUC."""

REFERENCE = ("Zech JR, Badgeley MA, Liu M, Costa AB, Titano JJ, Oermann EK. Variable generalization performance "
             "of a deep learning model to detect pneumonia in chest radiographs: a cross-sectional study. "
             "PLOS Medicine 15(11): e1002683, 2018.")

_MISSING_CATEGORY = ""  # how an unrecorded categorical value appears in the table (one category of its own)


class AcquisitionFeatures(NamedTuple):
    """The audit's design matrix, for inspection (the audits refit the encoding inside every fold)."""

    matrix: NDArray[np.float64]
    feature_names: list[str]
    fields_used: list[str]
    fields_dropped: dict[str, str]


def acquisition_table(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The acquisition fields of each row, with missing values made explicit and useless fields dropped.

    Numeric fields are floats with NaN where not recorded (``bits_stored`` 0, a non-positive spacing or matrix);
    categorical fields are stripped strings with ``""`` where not recorded. A field is dropped when it is not a
    column of ``manifest``, recorded in none of the rows, or the same recorded value in every row: it cannot
    tell any rows apart. A field recorded in only some rows is kept (whether it is recorded can itself be a
    shortcut).

    Args:
        manifest: rows with (some of) the columns of :data:`ACQUISITION_FIELDS` (``aspect_ratio`` is derived from
            ``rows`` and ``columns``).

    Returns:
        ``(table, dropped)``: the kept fields, in :data:`ACQUISITION_FIELDS` order, on ``manifest``'s index, and
        ``{field: why it was dropped}``.

    Examples:
        >>> table, dropped = acquisition_table(pd.DataFrame({"rows": [256, 192], "columns": [256, 256],
        ...                                                  "view_position": ["PA", "PA"], "age": [math.nan] * 2}))
        >>> list(table.columns), table["aspect_ratio"].round(2).tolist()
        (['rows', 'aspect_ratio'], [1.0, 1.33])
        >>> dropped["columns"], dropped["age"], dropped["vendor"]
        ('the same value (256) in every image', 'not recorded in these images', 'not a manifest column')
    """
    kept: dict[str, pd.Series] = {}
    dropped: dict[str, str] = {}
    for name, kind in ACQUISITION_FIELDS.items():
        values = _field_values(manifest, name, kind)
        if values is None:
            dropped[name] = "not a manifest column"
            continue
        recorded = values.notna() if kind == "numeric" else values != _MISSING_CATEGORY
        if not recorded.any():
            dropped[name] = "not recorded in these images"
        elif recorded.all() and values.nunique() == 1:
            dropped[name] = f"the same value ({_format_value(values.iloc[0])}) in every image"
        else:
            kept[name] = values
    return pd.DataFrame(kept, index=manifest.index), dropped


def acquisition_features(manifest: pd.DataFrame) -> AcquisitionFeatures:
    """Encode the acquisition fields as the audits' logistic regression sees them, fitted on all ``manifest`` rows.

    Numeric fields: NaN imputed with the median plus a missing indicator (only for fields with missing values),
    then standardised; categorical fields: one-hot (``""`` = not recorded is a category of its own). Fields
    dropped by :func:`acquisition_table` are listed with the reason.

    Args:
        manifest: rows with (some of) the columns of :data:`ACQUISITION_FIELDS`.

    Returns:
        An :class:`AcquisitionFeatures`; ``matrix`` is ``(len(manifest), len(feature_names))`` (no columns when
        every field was dropped).

    Examples:
        >>> f = acquisition_features(pd.DataFrame({"rows": [256, 192, 200], "columns": [256, 256, 256],
        ...                                        "view_position": ["PA", "AP", "PA"]}))
        >>> f.fields_used, f.matrix.shape
        (['rows', 'aspect_ratio', 'view_position'], (3, 4))
        >>> f.feature_names[-2:]
        ['view_position_AP', 'view_position_PA']
    """
    table, dropped = acquisition_table(manifest)
    if table.shape[1] == 0:
        return AcquisitionFeatures(np.zeros((len(manifest), 0)), [], [], dropped)
    encoder = _encoder(_kinds(table))
    matrix = np.asarray(encoder.fit_transform(table), dtype=np.float64)
    names = [name.split("__", 1)[1] for name in encoder.get_feature_names_out()]
    return AcquisitionFeatures(matrix, names, list(table.columns), dropped)


def grouped_folds(target: NDArray, patients: NDArray, n_splits: int = 5,
                  seed: int = 0) -> tuple[list[tuple[NDArray[np.intp], NDArray[np.intp]]], dict]:
    """Cross-validation folds by patient: every image of a patient falls in the same fold.

    ``StratifiedGroupKFold`` (class proportions kept per fold as far as patients allow); ``GroupKFold`` when that
    leaves a training fold without some class. The number of folds is at most the number of patients of the
    rarest class, so every class can appear in every training fold.

    Args:
        target: ``(N,)`` class of each image (any hashable values).
        patients: ``(N,)`` patient of each image.
        n_splits: folds wanted (at least 2).
        seed: shuffles the stratified assignment.

    Returns:
        ``(folds, cv)``: ``[(train indices, test indices), ...]`` and ``{"splitter", "n_splits"}``.

    Raises:
        ValueError: with a reason a reviewer can read when no such split exists (one class, or fewer than two
            patients of some class).

    Examples:
        >>> y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
        >>> patients = np.array(["p1", "p1", "p2", "p2", "p3", "p4", "p5", "p6"])
        >>> folds, cv = grouped_folds(y, patients, n_splits=2)
        >>> cv["n_splits"], all(not set(patients[tr]) & set(patients[te]) for tr, te in folds)
        (2, True)
    """
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    target, patients = np.asarray(target), np.asarray(patients)
    classes = pd.unique(target)
    if len(classes) < 2:
        raise ValueError(f"only one class ({_format_value(classes[0]) if len(classes) else 'none'}) among the "
                         f"{len(target)} images: nothing to predict")
    patients_per_class = {c: len(set(patients[target == c])) for c in classes}
    rarest = min(patients_per_class, key=patients_per_class.get)
    k = min(n_splits, patients_per_class[rarest])
    if k < 2:
        raise ValueError(f"class {_format_value(rarest)} comes from {patients_per_class[rarest]} patient: "
                         "cross-validation by patient needs at least 2 patients of each class")
    placeholder = np.zeros((len(target), 1))
    for splitter in (StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), GroupKFold(n_splits=k)):
        try:
            folds = list(splitter.split(placeholder, target, patients))
        except ValueError:
            continue
        if all(len(pd.unique(target[train])) == len(classes) and len(test) for train, test in folds):
            return folds, {"splitter": type(splitter).__name__, "n_splits": int(k)}
    raise ValueError(f"no {k}-fold split by patient keeps every class in each training fold "
                     "(patients with images of several classes?)")


def audit_label(manifest_rows: pd.DataFrame, *, n_splits: int = 5, n_bootstrap: int = 1000,
                confidence: float = 0.95, seed: int = 0) -> dict:
    """How well one hospital's labels can be predicted from the acquisition alone.

    A logistic regression (``class_weight="balanced"``, so prevalence alone earns nothing) predicts the label from
    the acquisition fields; its out-of-fold probabilities come from cross-validation grouped by patient
    (:func:`grouped_folds`), and their AUC gets a patient-level bootstrap CI. ``field_auc`` repeats the same
    cross-validation with each field alone. Rows without a label are ignored. Labels with more than two classes
    get the one-vs-rest macro AUC (as :func:`audit_hospital`).

    Args:
        manifest_rows: one hospital's rows: ``label`` (nullable), ``patient_id``, ``hospital`` and the acquisition
            columns of the manifest (missing columns count as unrecorded fields).
        n_splits: cross-validation folds (fewer when a class has fewer patients).
        n_bootstrap: patient-level bootstrap replicates of the AUC's CI; 0 = point estimate only.
        confidence: two-sided level of the CI.
        seed: seed of the fold assignment and the bootstrap.

    Returns:
        JSON-ready ``{"target": "label", "hospital", "n", "n_patients", "n_positive", "classes": {label: count},
        "auc": {"value", "ci_low", "ci_high"}, "fields_used", "fields_dropped": {field: reason},
        "field_auc": [{"field", "auc"}, ...] (highest first), "predictable": bool, "threshold", "cv":
        {"splitter", "n_splits"}}``; with too few images, one class or no usable field, ``auc`` holds ``None``
        values, ``predictable`` is False and ``reason`` says why. Undefined numbers are ``None``, never NaN.

    Raises:
        ValueError: when the rows belong to several hospitals (use :func:`shortcut_audit`) or lack ``label`` /
            ``patient_id``.

    Examples:
        A hospital whose positives were acquired on a smaller matrix, AP:

        >>> rng = np.random.default_rng(0)
        >>> label = np.arange(60) % 2
        >>> rows = pd.DataFrame({"label": label, "hospital": "a", "patient_id": [f"p{i}" for i in range(60)],
        ...                      "rows": np.where(label == 1, 192, 256) + rng.integers(-12, 13, 60),
        ...                      "columns": 256 + rng.integers(-12, 13, 60),
        ...                      "view_position": np.where(label == 1, "AP", "PA")})
        >>> result = audit_label(rows, n_bootstrap=200)
        >>> result["predictable"], round(result["auc"]["value"], 2), result["field_auc"][0]["auc"] > 0.9
        (True, 1.0, True)
        >>> audit_label(rows.assign(label=0))["reason"]
        'only one class (0) among the 60 images: nothing to predict'
    """
    hospital = _single_hospital(manifest_rows)
    _require(manifest_rows, ("label", "patient_id"))
    labeled = manifest_rows[manifest_rows["label"].notna()]
    target = labeled["label"].to_numpy(dtype=np.int64)
    classes, counts = np.unique(target, return_counts=True)
    summary = {"target": "label", "hospital": hospital, "n": int(len(labeled)),
               "n_patients": int(labeled["patient_id"].nunique()), "n_positive": int((target != 0).sum()),
               "classes": {int(c): int(n) for c, n in zip(classes, counts)}}
    return _audit(labeled, target, summary, n_splits=n_splits, n_bootstrap=n_bootstrap, confidence=confidence,
                  seed=seed)


def audit_hospital(manifest_rows: pd.DataFrame, *, n_splits: int = 5, n_bootstrap: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> dict:
    """How well the hospital can be identified from the acquisition alone, and whether prevalences differ.

    The same machinery as :func:`audit_label`, with the hospital as the target: plain AUC for two hospitals,
    one-vs-rest macro AUC (the mean over hospitals of "this hospital vs the others") for three or more, with a
    patient-level bootstrap CI. Each hospital's prevalence comes from its labeled rows; a chi-square test of
    independence of label and hospital says whether they differ, and ``label_auc_from_hospital`` is how well the
    hospital *alone* predicts the label (out of fold: each test fold scored with its hospital's prevalence in the
    training folds), Zech et al.'s "AUC 0.861 from hospital alone".

    Args:
        manifest_rows: rows of two or more hospitals: ``hospital``, ``patient_id``, the acquisition columns and
            optionally ``label`` (nullable; needed for the prevalences).
        n_splits: cross-validation folds.
        n_bootstrap: patient-level bootstrap replicates; 0 = point estimates only.
        confidence: two-sided level of the CIs.
        seed: seed of the folds and the bootstrap.

    Returns:
        JSON-ready ``{"target": "hospital", "hospitals", "n", "n_patients", "n_per_hospital", "auc", "auc_kind":
        "binary" | "one-vs-rest macro", "fields_used", "fields_dropped", "field_auc", "predictable", "threshold",
        "cv", "prevalence": {hospital: fraction or None}, "prevalence_p_value", "prevalence_differs",
        "label_auc_from_hospital": {"value", "ci_low", "ci_high"}}``; ``reason`` (and ``None`` AUCs) when it
        cannot be computed.

    Raises:
        ValueError: when ``hospital`` or ``patient_id`` is missing.

    Examples:
        Two hospitals on different matrices, with the same prevalence:

        >>> n = 40
        >>> rows = pd.DataFrame({"hospital": np.repeat(["a", "b"], n), "patient_id": [f"p{i}" for i in range(2 * n)],
        ...                      "rows": np.repeat([256, 224], n) + np.arange(2 * n) % 5, "columns": 256,
        ...                      "label": np.arange(2 * n) % 2})
        >>> result = audit_hospital(rows, n_bootstrap=100)
        >>> result["predictable"], round(result["auc"]["value"], 2), result["prevalence_differs"]
        (True, 1.0, False)
    """
    _require(manifest_rows, ("hospital", "patient_id"))
    hospitals = sorted(manifest_rows["hospital"].astype(str).unique())
    target = manifest_rows["hospital"].astype(str).to_numpy()
    summary: dict = {"target": "hospital", "hospitals": hospitals, "n": int(len(manifest_rows)),
                     "n_patients": int(manifest_rows["patient_id"].nunique()),
                     "n_per_hospital": {h: int((target == h).sum()) for h in hospitals},
                     "auc_kind": "binary" if len(hospitals) <= 2 else "one-vs-rest macro"}
    summary.update(_prevalences(manifest_rows, n_splits=n_splits, n_bootstrap=n_bootstrap, confidence=confidence,
                                seed=seed))
    return _audit(manifest_rows, target, summary, n_splits=n_splits, n_bootstrap=n_bootstrap,
                  confidence=confidence, seed=seed)


def shortcut_audit(manifest: pd.DataFrame, *, n_splits: int = 5, n_bootstrap: int = 1000, confidence: float = 0.95,
                   seed: int = 0, pooled: list[str] | None = None) -> dict:
    """Both audits over a manifest, with warnings for a clinical reviewer.

    :func:`audit_label` for every hospital with labeled images (whatever its role: source, target, other;
    one with a single class gets its ``reason``), :func:`audit_hospital` over the labeled images of those
    hospitals. A warning is written for each hospital whose label is predictable from the acquisition, and one
    when the hospital is identifiable from the acquisition *and* the prevalence differs between hospitals whose
    images one model is trained on together (``pooled``): a model trained on one hospital cannot learn another's
    prevalence.

    Args:
        manifest: the manifest (:func:`medtl.ingest.load_manifest`), or any frame with its acquisition columns,
            ``label``, ``hospital`` and ``patient_id``.
        n_splits: cross-validation folds.
        n_bootstrap: patient-level bootstrap replicates of every CI.
        confidence: two-sided level of the CIs.
        seed: seed of the folds and the bootstrap.
        pooled: the hospitals training pools (e.g. ``data.source_hospitals``); the hospital warning needs two or
            more of them, and is about those. None = every labeled hospital.

    Returns:
        JSON-ready ``{"label": [per-hospital audit_label dicts], "hospital": audit_hospital dict, "threshold":
        LABEL_SHORTCUT_AUC, "confidence", "warnings": [sentences], "reference": REFERENCE}``.

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> n = 60
        >>> label = np.arange(2 * n) % 2
        >>> rows = np.where((label == 1) & (np.arange(2 * n) < n), 192, 256) + rng.integers(-8, 9, 2 * n)
        >>> manifest = pd.DataFrame({"hospital": np.repeat(["a", "b"], n), "label": label, "rows": rows,
        ...                          "columns": 256, "patient_id": [f"p{i}" for i in range(2 * n)]})
        >>> audit = shortcut_audit(manifest, n_bootstrap=100)
        >>> [(r["hospital"], r["predictable"]) for r in audit["label"]]
        [('a', True), ('b', False)]
        >>> print(audit["warnings"][0].split(" — ")[0])
        At a, the label can be predicted from the acquisition alone (AUC 1.00 [1.00–1.00])
    """
    _require(manifest, ("label", "hospital", "patient_id"))
    labeled = manifest[manifest["label"].notna()]
    names = sorted(labeled["hospital"].astype(str).unique())
    options = {"n_splits": n_splits, "n_bootstrap": n_bootstrap, "confidence": confidence, "seed": seed}
    label_audits = [audit_label(labeled[labeled["hospital"].astype(str) == name], **options) for name in names]
    if len(names) >= 2:
        hospital_audit = audit_hospital(labeled, **options)
    else:
        hospital_audit = {"target": "hospital", "hospitals": names, "n": int(len(labeled)),
                          "auc": _none_interval(), "predictable": False, "threshold": LABEL_SHORTCUT_AUC,
                          "reason": "fewer than two hospitals with labeled images: nothing to tell apart"}
    warnings_out = [_label_warning(a) for a in label_audits if a["predictable"]]
    together = names if pooled is None else sorted(set(pooled) & set(names))
    if len(together) >= 2:
        pooled_audit = (hospital_audit if together == names else
                        audit_hospital(labeled[labeled["hospital"].astype(str).isin(together)], **options))
        if pooled_audit["predictable"] and pooled_audit.get("prevalence_differs"):
            warnings_out.append(_hospital_warning(pooled_audit))
    return {"label": label_audits, "hospital": hospital_audit, "threshold": LABEL_SHORTCUT_AUC,
            "confidence": float(confidence), "warnings": warnings_out, "reference": REFERENCE}


# ----------------------------------------------------------------------------------------------------- helpers


def _field_values(manifest: pd.DataFrame, name: str, kind: str) -> pd.Series | None:
    """One field as the audit reads it; None when the manifest cannot provide it."""
    if name == "aspect_ratio":
        if "rows" not in manifest or "columns" not in manifest:
            return None
        rows, columns = _recorded_number(manifest["rows"]), _recorded_number(manifest["columns"])
        return (columns / rows).rename(name)
    if name not in manifest:
        return None
    values = manifest[name]
    if kind == "numeric":
        # bits_stored 0, a zero matrix or spacing = not recorded; an age of 0 years is a newborn's
        return _recorded_number(values, zero_allowed=name == "age").rename(name)
    text = values.astype(object).where(values.notna(), _MISSING_CATEGORY)
    return text.map(lambda v: str(v).strip()).astype(object).rename(name)


def _recorded_number(values: pd.Series, zero_allowed: bool = False) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
    return numbers.where(np.isfinite(numbers) & ((numbers >= 0) if zero_allowed else (numbers > 0)))


def _kinds(table: pd.DataFrame) -> dict[str, str]:
    return {name: ACQUISITION_FIELDS[name] for name in table.columns}


def _encoder(kinds: Mapping[str, str]) -> ColumnTransformer:
    numeric = [name for name, kind in kinds.items() if kind == "numeric"]
    categorical = [name for name, kind in kinds.items() if kind == "categorical"]
    parts = []
    if numeric:
        # keep_empty_features: a field missing in every image of one training fold still yields its column
        parts.append(("numeric", make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                                             keep_empty_features=True), StandardScaler()), numeric))
    if categorical:
        parts.append(("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categorical))
    return ColumnTransformer(parts)


def _model(kinds: Mapping[str, str]) -> Pipeline:
    # balanced: a constant score earns AUC 0.5 whatever the prevalence, and the rarer class is not ignored
    return Pipeline([("features", _encoder(kinds)),
                     ("classifier", LogisticRegression(class_weight="balanced", max_iter=1000))])


def _out_of_fold(table: pd.DataFrame, codes: NDArray[np.intp], n_classes: int,
                 folds: list[tuple[NDArray[np.intp], NDArray[np.intp]]]) -> NDArray[np.float64]:
    """``(N, n_classes)`` probabilities of each image from the model fitted on the other folds."""
    probabilities = np.zeros((len(codes), n_classes))
    kinds = _kinds(table)
    for train, test in folds:
        with warnings.catch_warnings():
            # near-separable folds (a strong shortcut) stop at max_iter with an ample fit: not worth a warning
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = _model(kinds).fit(table.iloc[train], codes[train])
        probabilities[np.ix_(test, model.classes_)] = model.predict_proba(table.iloc[test])
    return probabilities


def _audit(rows: pd.DataFrame, target: NDArray, summary: dict, *, n_splits: int, n_bootstrap: int,
           confidence: float, seed: int) -> dict:
    """The shared machinery: fields, folds, out-of-fold AUC with CI, per-field AUC."""
    table, dropped = acquisition_table(rows)
    result = {**summary, "auc": _none_interval(), "fields_used": list(table.columns), "fields_dropped": dropped,
              "field_auc": [], "predictable": False, "threshold": LABEL_SHORTCUT_AUC}
    if len(rows) < MIN_IMAGES:
        return {**result, "reason": f"{len(rows)} images: at least {MIN_IMAGES} are needed for a cross-validated "
                                    "audit"}
    patients = rows["patient_id"].astype(str).to_numpy()
    try:
        folds, cv = grouped_folds(target, patients, n_splits=n_splits, seed=seed)
    except ValueError as exc:
        return {**result, "reason": str(exc)}
    result["cv"] = cv
    if table.shape[1] == 0:
        return {**result, "reason": "no acquisition field differs between these images: nothing for a model to "
                                    "read (AUC 0.5)"}
    codes, classes = pd.factorize(pd.Series(target), sort=True)
    codes = codes.astype(np.intp)
    table = table.reset_index(drop=True)
    probabilities = _out_of_fold(table, codes, len(classes), folds)
    auc = _auc_with_ci(codes, probabilities, patients, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    field_auc = []
    for name in table.columns:
        alone = _out_of_fold(table[[name]], codes, len(classes), folds)
        field_auc.append({"field": name, "auc": _json_number(_auc_point(codes, alone))})
    order = list(ACQUISITION_FIELDS)
    field_auc.sort(key=lambda item: (-(item["auc"] if item["auc"] is not None else -math.inf),
                                     order.index(item["field"])))
    value = auc["value"]
    return {**result, "auc": auc, "field_auc": field_auc,
            "predictable": bool(value is not None and value >= LABEL_SHORTCUT_AUC)}


def _auc_point(codes: NDArray[np.intp], probabilities: NDArray[np.float64]) -> float:
    return _auc_replicates(codes, probabilities, np.ones((1, len(codes))))[0]


def _auc_replicates(codes: NDArray[np.intp], probabilities: NDArray[np.float64],
                    weights: NDArray[np.float64]) -> NDArray[np.float64]:
    """AUC per row of sample weights: binary, or the one-vs-rest macro mean (NaN when a class is absent)."""
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        return _weighted_auc((codes == 1).astype(np.float64), probabilities[:, 1], weights)
    per_class = [_weighted_auc((codes == k).astype(np.float64), probabilities[:, k], weights)
                 for k in range(n_classes)]
    return np.mean(per_class, axis=0)


def _auc_with_ci(codes: NDArray[np.intp], probabilities: NDArray[np.float64], patients: NDArray, *,
                 n_bootstrap: int, confidence: float, seed: int) -> dict:
    """Out-of-fold AUC with a percentile CI from resampling patients."""
    if probabilities.shape[1] == 2:  # the project's binary metrics: the same bootstrap as the report's AUCs
        auc = binary_metrics(codes, np.clip(probabilities[:, 1], 0.0, 1.0), groups=patients,
                             n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)["auc"]
        return {key: _json_number(value) for key, value in auc.items()}
    value = float(_auc_point(codes, probabilities))
    group_codes, n_groups = _group_codes(patients, len(codes))
    replicates = np.empty(n_bootstrap)
    rng = np.random.default_rng(seed)
    for start, stop in _blocks(n_bootstrap, max(len(codes), n_groups)):
        weights = _group_weights(rng, n_groups, stop - start)[:, group_codes]
        replicates[start:stop] = _auc_replicates(codes, probabilities, weights)
    low, high, _ = _percentile_ci(replicates, confidence) if n_bootstrap else (math.nan, math.nan, 0)
    return {"value": _json_number(value), "ci_low": _json_number(low), "ci_high": _json_number(high)}


def _prevalences(rows: pd.DataFrame, *, n_splits: int, n_bootstrap: int, confidence: float, seed: int) -> dict:
    """Per-hospital prevalence of the finding (label != 0), the chi-square test and the AUC of hospital alone."""
    hospitals = sorted(rows["hospital"].astype(str).unique())
    out: dict = {"prevalence": {h: None for h in hospitals}, "prevalence_p_value": None,
                 "prevalence_differs": False, "label_auc_from_hospital": _none_interval()}
    if "label" not in rows:
        return out
    labeled = rows[rows["label"].notna()]
    site = labeled["hospital"].astype(str).to_numpy()
    finding = (labeled["label"].to_numpy(dtype=np.int64) != 0).astype(np.int64)
    for h in hospitals:
        if (site == h).any():
            out["prevalence"][h] = float(finding[site == h].mean())
    table = pd.crosstab(site, finding)
    if table.shape == (len(set(site)), 2) and table.shape[0] >= 2:
        out["prevalence_p_value"] = _json_number(chi2_contingency(table.to_numpy())[1])
        out["prevalence_differs"] = bool(out["prevalence_p_value"] is not None
                                         and out["prevalence_p_value"] < PREVALENCE_DIFFERENCE_P)
    patients = labeled["patient_id"].astype(str).to_numpy()
    if len(labeled) >= MIN_IMAGES and len(set(site)) >= 2:
        try:
            folds, _ = grouped_folds(finding, patients, n_splits=n_splits, seed=seed)
        except ValueError:
            return out
        score = np.empty(len(finding))
        for train, test in folds:
            overall = finding[train].mean()
            for h in set(site[test]):
                seen = train[site[train] == h]
                score[test[site[test] == h]] = finding[seen].mean() if len(seen) else overall
        auc = binary_metrics(finding, score, groups=patients, n_bootstrap=n_bootstrap, confidence=confidence,
                             seed=seed)["auc"]
        out["label_auc_from_hospital"] = {key: _json_number(value) for key, value in auc.items()}
    return out


def _label_warning(audit: dict) -> str:
    return (f"At {audit['hospital']}, the label can be predicted from the acquisition alone "
            f"({_format_auc(audit['auc'])}) — mainly {_top_fields(audit)}: a model may learn the acquisition "
            "instead of the anatomy (Zech et al. 2018: pneumonia CNNs read the hospital and its prevalence). "
            "Check that images with and without the finding were acquired alike.")


def _hospital_warning(audit: dict) -> str:
    prevalence = ", ".join(f"{h} {100 * p:.0f} %" for h, p in audit["prevalence"].items() if p is not None)
    from_hospital = audit["label_auc_from_hospital"]["value"]
    alone = f"; the hospital alone predicts the label with AUC {from_hospital:.2f}" if from_hospital is not None else ""
    return (f"The hospital can be identified from the acquisition alone ({_format_auc(audit['auc'])}, mainly "
            f"{_top_fields(audit)}) and the prevalence of the finding differs between hospitals ({prevalence}; "
            f"chi-square p = {audit['prevalence_p_value']:.2g}{alone}): a model trained on images pooled from "
            "these hospitals may learn to recognise the hospital and predict its prevalence instead of reading the "
            "anatomy (Zech et al. 2018). Compare performance within each hospital, and balance the prevalence "
            "between training hospitals where possible.")


def _top_fields(audit: dict, most: int = 3) -> str:
    """The fields that carry the prediction: those predictive alone (at most ``most``), else the best two."""
    ranked = [item for item in audit["field_auc"] if item["auc"] is not None]
    strong = [item for item in ranked if item["auc"] >= LABEL_SHORTCUT_AUC][:most] or ranked[:2]
    return ", ".join(f"{item['field']} ({FIELD_DESCRIPTIONS[item['field']]})" for item in strong) or "no single field"


def _format_auc(auc: dict) -> str:
    text = f"AUC {auc['value']:.2f}"
    if auc["ci_low"] is not None and auc["ci_high"] is not None:
        text += f" [{auc['ci_low']:.2f}–{auc['ci_high']:.2f}]"
    return text


def _single_hospital(rows: pd.DataFrame) -> str:
    if "hospital" not in rows:
        return ""
    names = sorted(rows["hospital"].astype(str).unique())
    if len(names) > 1:
        raise ValueError(f"audit_label audits one hospital's rows, got {len(names)} hospitals ({', '.join(names)}); "
                         "shortcut_audit audits each of them")
    return names[0] if names else ""


def _require(rows: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in rows]
    if missing:
        raise ValueError(f"the shortcut audit needs the manifest columns {missing}; got {list(rows.columns)}")


def _none_interval() -> dict:
    return {"value": None, "ci_low": None, "ci_high": None}


def _json_number(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _format_value(value: object) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)
