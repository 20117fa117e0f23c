"""Typed configuration for every stage, loaded from YAML.

One `PipelineConfig` holds a section per stage; each stage function takes only its own
section plus a :class:`Workspace`. Unknown keys are errors (``extra="forbid"``) so a typo in
a YAML file fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class HospitalProfile(StrictModel):
    """How one synthetic hospital acquires and stores a chest radiograph."""

    class PositiveAcquisition(StrictModel):
        """How images *with the finding* are acquired at this hospital, where that differs (each field unset = as
        the hospital's other images): an acquisition shortcut, like the sick children of the paediatric
        pneumonia collection imaged on other, smaller matrices, or inpatients imaged AP on a portable unit at the
        bedside. A model can then read the label off the acquisition instead of the anatomy, which
        ``medtl.evaluate.shortcut`` detects from the manifest."""

        rows: int | None = Field(None, ge=32, le=4096)
        columns: int | None = Field(None, ge=32, le=4096)
        pixel_spacing_mm: float | None = Field(None, gt=0)
        view_position: Literal["PA", "AP"] | None = None
        bits_stored: Literal[10, 12, 14, 16] | None = None
        photometric: Literal["MONOCHROME1", "MONOCHROME2"] | None = None
        manufacturer: str | None = None
        model_name: str | None = None

        @model_validator(mode="after")
        def _not_empty(self) -> HospitalProfile.PositiveAcquisition:
            if all(getattr(self, name) is None for name in type(self).model_fields):  # changes nothing: a mistake
                raise ValueError("positive_acquisition sets nothing; give e.g. {rows: 160, columns: 192, "
                                 "view_position: AP}, or leave it out")
            return self

    name: str
    manufacturer: str
    model_name: str
    institution: str
    rows: int = Field(256, ge=32, le=4096)
    columns: int = Field(256, ge=32, le=4096)
    pixel_spacing_mm: float = Field(1.4, gt=0)
    bits_stored: Literal[10, 12, 14, 16] = 12
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    gamma: float = Field(1.0, gt=0, description="intensity curve exponent applied to the detector signal")
    contrast: float = Field(1.0, gt=0)
    noise_std: float = Field(0.02, ge=0, description="Gaussian noise, fraction of full scale")
    blur_sigma_px: float = Field(0.0, ge=0)
    prevalence: float = Field(0.5, gt=0, lt=1, description="fraction of labeled images with the finding")
    view_position: Literal["PA", "AP"] = Field("PA", description="ViewPosition of the chest radiographs")
    positive_acquisition: PositiveAcquisition | None = Field(
        None, description="an acquisition shortcut: images with the finding acquired differently (matrix, spacing, "
                          "view, detector), e.g. {rows: 160, columns: 192, view_position: AP}; None = alike")
    acquisition_shift: str | dict[str, str | float | bool | None] | None = Field(
        None, description="a further acquisition shift through medtl.data.shift (exposure, quantum noise, blur, "
                          "lower resolution, contrast curve, windowing mistakes, inversion, collimation, crop): a "
                          "preset name (e.g. low_dose_portable) or AcquisitionProfile fields, optionally on a preset, "
                          "e.g. {preset: low_dose_portable, collimation: 0.1}")

    @field_validator("acquisition_shift")
    @classmethod
    def _valid_shift(cls, value: str | dict | None) -> str | dict | None:
        if value is not None:
            from medtl.data.shift import profile_from_spec  # torch-heavy: only when a shift is configured

            profile_from_spec(value, "hospital")
        return value


def _default_hospitals() -> list[HospitalProfile]:
    return [
        HospitalProfile(name="hospital_a", manufacturer="GE Healthcare", model_name="Definium 8000",
                        institution="St. Aurelia General Hospital", rows=256, columns=256, pixel_spacing_mm=1.4,
                        bits_stored=12, photometric="MONOCHROME2", rescale_slope=1.0, rescale_intercept=0.0,
                        gamma=1.0, contrast=1.0, noise_std=0.02, blur_sigma_px=0.0, prevalence=0.5),
        HospitalProfile(name="hospital_b", manufacturer="SIEMENS", model_name="Ysio Max",
                        institution="Northbridge University Clinic", rows=224, columns=224, pixel_spacing_mm=1.6,
                        bits_stored=14, photometric="MONOCHROME1", rescale_slope=2.0, rescale_intercept=-1024.0,
                        gamma=0.8, contrast=0.9, noise_std=0.04, blur_sigma_px=0.8, prevalence=0.4),
        HospitalProfile(name="hospital_c", manufacturer="Philips Medical Systems", model_name="DigitalDiagnost",
                        institution="Harbor Valley Medical Center", rows=288, columns=288, pixel_spacing_mm=1.25,
                        bits_stored=10, photometric="MONOCHROME2", rescale_slope=1.0, rescale_intercept=0.0,
                        gamma=1.5, contrast=0.7, noise_std=0.06, blur_sigma_px=1.5, prevalence=0.3),
    ]


class SynthConfig(StrictModel):
    """The embedded synthetic multi-hospital cohort (``medtl synth``)."""

    seed: int = 0
    hospitals: list[HospitalProfile] = Field(default_factory=_default_hospitals, min_length=1)
    labeled_per_hospital: int = Field(160, ge=4)
    unlabeled_per_hospital: int = Field(320, ge=0)
    images_per_patient: int = Field(1, ge=1, le=4)
    broken_files: int = Field(3, ge=0, description="truncated / not-DICOM / no-pixel-data files to plant")
    workers: int = Field(0, ge=0, description="processes rendering images; 0 = one per available CPU, "
                                              "1 = in this process (output is identical either way)")

    def site_aliases(self) -> dict[str, str]:
        """``ingest.deid.site_aliases`` for this cohort: each InstitutionName labels itself in the manifest (the
        hospitals are fictional, not PHI), so ``data.source_hospitals`` can name them as they are written.

        Returns:
            institution → the same name, for every hospital of the cohort.
        """
        return {h.institution: h.institution for h in self.hospitals}


class DeidConfig(StrictModel):
    """De-identification (DICOM PS3.15 Annex E basic profile) and its options (see ``medtl.ingest.deid`` and
    ``docs/deid_profile.md``)."""

    profile: Literal["allow_list", "annex_e"] = Field(
        "allow_list", description="allow_list = keep only what the model and the manifest need (pixels, geometry, "
                                  "pixel value transforms, acquisition parameters, pseudonymised UIDs and PatientID) "
                                  "plus what the options below retain, and remove everything else at any depth; "
                                  "annex_e = PS3.15 Table E.1-1 as a deny-list: attributes it does not list are kept "
                                  "(descriptions, comments, code meanings: pair it with clean_descriptors), except "
                                  "names, dates and instance UIDs by their dictionary VR and unknown public tags")

    uid_secret_env: str = Field("MEDTL_UID_SECRET", description="environment variable holding the hashing key "
                                                                "(UIDs, PatientID, date shifts, site pseudonyms)")
    uid_secret: str | None = Field(None, description="the hashing key; prefer the environment variable")
    uid_root: str = Field("2.25", description="UID root of remapped UIDs (2.25 = UUID-derived, needs no registration)")
    keep_dicom: bool = Field(True, description="also write the de-identified DICOM next to the arrays")
    longitudinal_temporal: Literal["remove", "shift", "keep"] = Field(
        "remove", description="dates and times: remove (basic profile); shift = Retain Longitudinal Temporal "
                              "Information with Modified Dates (one keyed shift per patient, intervals kept); "
                              "keep = the Full Dates option")
    date_shift_max_days: int = Field(3650, ge=1, le=36500,
                                     description="shift: each patient's dates move back by 1..this many days")
    retain_device_identity: bool = Field(False, description="Retain Device Identity option (station, serials)")
    retain_institution_identity: bool = Field(False, description="Retain Institution Identity option")
    retain_patient_characteristics: bool = Field(False, description="Retain Patient Characteristics option "
                                                                    "(sex, age, size, weight, ...)")
    clean_descriptors: bool = Field(False, description="Clean Descriptors option: keep descriptions and comments "
                                                       "with the patient's names, IDs, dates and numbers scrubbed")
    private_safe_list: list[str] = Field(
        default_factory=list, description="private elements to keep, each 'GGGG,private creator,EE' (hex group, "
                                          "creator string, hex element byte), e.g. '0019,GEMS_ACQU_01,1B'; "
                                          "every other private element is removed")
    pixels_cleaned_upstream: bool = Field(
        False, description="images with (possible) burned-in annotation are quarantined unless this says their "
                           "pixels were cleaned before ingestion; medtl does not clean pixels itself")
    site_aliases: dict[str, str] = Field(
        default_factory=dict, description="label written to the manifest for each raw value of "
                                          "ingest.site_attribute; every unlisted site (all of them when this is "
                                          "empty) gets a keyed pseudonym site-<10 hex>, so the institution's name "
                                          "stays out of every output. The synthetic cohort's institutions are "
                                          "added, each as its own label, when ingest reads that cohort")

    @field_validator("private_safe_list")
    @classmethod
    def _private_rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            parts = [p.strip() for p in rule.split(",")]
            ok = len(parts) == 3 and parts[1] != ""
            try:
                group, element = int(parts[0], 16), int(parts[2], 16)
            except (ValueError, IndexError):
                ok = False
            else:
                ok = ok and group % 2 == 1 and 0x0009 <= group <= 0xFFFF and 0 <= element <= 0xFF
            if not ok:
                raise ValueError(f"private_safe_list entry {rule!r} is not 'GGGG,private creator,EE' with an odd "
                                 "hex group and a hex element byte, e.g. '0019,GEMS_ACQU_01,1B'")
        return rules


_UID = r"^[0-9]+(\.[0-9]+)*$"
_AE_TITLE = r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$"
_NO_BACKSLASH = r"^[^\\]+$"


class PacsQuery(StrictModel):
    """Which studies to pull from a PACS: a study must match every filter that is set (DICOM PS3.4 C.2.2
    attribute matching; ``*`` and ``?`` are wildcards in ``patient_id`` and ``accession_number``)."""

    patient_id: str | None = Field(None, max_length=64, pattern=_NO_BACKSLASH, description="PatientID")
    study_date_from: date | None = Field(None, description="first StudyDate to pull (inclusive)")
    study_date_to: date | None = Field(None, description="last StudyDate to pull (inclusive)")
    modality: str | None = Field(None, pattern=r"^[A-Z0-9_]{1,16}$",
                                 description="a modality the study contains (ModalitiesInStudy), e.g. CT, DX")
    accession_number: str | None = Field(None, max_length=16, pattern=_NO_BACKSLASH, description="AccessionNumber")
    study_instance_uids: list[Annotated[str, Field(max_length=64, pattern=_UID)]] = Field(
        default_factory=list, description="pull only these StudyInstanceUIDs")
    max_studies: int = Field(1000, ge=1, description="refuse a query matching more studies than this")

    @model_validator(mode="after")
    def _narrow(self) -> "PacsQuery":
        if not (self.patient_id or self.study_date_from or self.study_date_to or self.modality
                or self.accession_number or self.study_instance_uids):
            raise ValueError("pacs.query sets no filter, which would pull the whole PACS; set at least one of "
                             "patient_id, study_date_from/study_date_to, modality, accession_number, "
                             "study_instance_uids")
        if self.study_date_from and self.study_date_to and self.study_date_from > self.study_date_to:
            raise ValueError(f"pacs.query.study_date_from {self.study_date_from} is after study_date_to "
                             f"{self.study_date_to}; swap them")
        return self


class PacsConfig(StrictModel):
    """Pull studies from a PACS into ``<workdir>/pacs_incoming`` before ingestion: DICOMweb (QIDO-RS +
    WADO-RS, DICOM PS3.18) or DIMSE (C-FIND + C-GET or C-MOVE, DICOM PS3.4 Annex C). Transient errors are
    retried with exponential backoff; credentials come from environment variables, never from the YAML."""

    protocol: Literal["dicomweb", "dimse"]
    url: str | None = Field(None, pattern=r"^https?://", description="DICOMweb base URL, "
                                                                     "e.g. https://pacs.example.org/dicom-web")
    username_env: str | None = Field(None, description="environment variable holding the DICOMweb user name")
    password_env: str | None = Field(None, description="environment variable holding the DICOMweb password")
    token_env: str | None = Field(None, description="environment variable holding a DICOMweb bearer token")
    host: str | None = Field(None, description="DIMSE: PACS host name or address")
    port: int | None = Field(None, ge=1, le=65535, description="DIMSE: PACS port")
    called_ae_title: str | None = Field(None, pattern=_AE_TITLE,
                                        description="DIMSE: the PACS's AE title (1-16 characters, no backslash)")
    calling_ae_title: str = Field("MEDTL", pattern=_AE_TITLE,
                                  description="DIMSE: our AE title, also the C-MOVE destination "
                                              "(1-16 characters, no backslash)")
    retrieve: Literal["c-get", "c-move"] = Field("c-get", description="DIMSE retrieval service")
    move_port: int | None = Field(None, ge=1, le=65535,
                                  description="C-MOVE: port of our storage SCP; the PACS must know "
                                              "calling_ae_title at this host and port")
    move_bind_address: str = Field("0.0.0.0", description="C-MOVE: address our storage SCP listens on")
    query: PacsQuery
    retries: int = Field(4, ge=0, le=20, description="retries of each operation after a transient error")
    backoff_base_s: float = Field(1.0, gt=0, description="wait before the first retry; doubles on each retry")
    backoff_max_s: float = Field(60.0, gt=0, description="longest wait between two retries")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connection timeout")
    timeout_s: float = Field(60.0, gt=0, description="HTTP read / DIMSE message / association timeout")

    @model_validator(mode="after")
    def _protocol_fields(self) -> "PacsConfig":
        if self.protocol == "dicomweb":
            wrong, needed = ("host", "port", "called_ae_title", "move_port"), ("url",)
        else:
            wrong, needed = ("url", "username_env", "password_env", "token_env"), ("host", "port", "called_ae_title")
            if self.retrieve == "c-move":
                needed += ("move_port",)
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"pacs.protocol {self.protocol!r} needs {missing}; set them in the pacs section")
        extra = [f for f in wrong if getattr(self, f) is not None]
        if extra:
            raise ValueError(f"pacs.{extra} do not apply to protocol {self.protocol!r}; remove them")
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("pacs.username_env and pacs.password_env go together; set both or neither")
        if self.token_env is not None and self.username_env is not None:
            raise ValueError("pacs: choose basic authentication (username_env/password_env) or a bearer token "
                             "(token_env), not both")
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError(f"pacs.backoff_base_s {self.backoff_base_s} exceeds backoff_max_s "
                             f"{self.backoff_max_s}")
        return self


PhilipsScaling = Literal["precise", "display"]
"""How 3D Philips volumes are scaled (``ingest.philips_scaling``; :func:`medtl.ingest.vendor.precise_scaling`)."""


class IngestConfig(StrictModel):
    """Folder → de-identified, validated arrays + manifest (``medtl ingest``)."""

    input_dir: Path | None = Field(None, description="DICOM folder; default <workdir>/dicom (the synthetic cohort)")
    labels_csv: Path | None = Field(None, description="CSV with columns path,label (path relative to input_dir); "
                                                      "default <input_dir>/labels.csv when present")
    site_attribute: str = Field("InstitutionName", description="DICOM keyword whose value names the hospital")
    image_size: int = Field(128, ge=16, le=2048, description="stored arrays are resized to this square size")
    spatial_dims: Literal[2, 3] = 2
    windowing: Literal["percentile", "dicom"] = Field(
        "percentile", description="percentile = robust 0.5-99.5 % window of each image, the same rule for every "
                                  "site; dicom = the header's VOI LUT / WindowCenter+Width when present (else "
                                  "percentile). See docs/decoding.md")
    philips_scaling: PhilipsScaling = Field(
        "precise", description="3D Philips volumes: precise = Philips' floating-point values (scale slope "
                               "2005,100E; dcm2niix's default), display = RescaleSlope/Intercept (what a viewer "
                               "shows). The manifest's intensity_scaling says which a volume got")
    max_decoded_mib: int = Field(768, ge=1, description="refuse files whose declared pixels would decode to more "
                                                        "than this (stored samples + float64 grey; decoding peaks "
                                                        "near 2.6x): decompression bombs. Keep worker_memory_mb "
                                                        ">= 3x this")
    deid: DeidConfig = Field(default_factory=DeidConfig)
    pacs: PacsConfig | None = Field(None, description="pull from this PACS into <workdir>/pacs_incoming and "
                                                      "ingest that folder (then input_dir must be unset)")
    workers: int = Field(1, ge=0, description="processes reading and converting files; 0 = one per available CPU")
    worker_memory_mb: int = Field(3072, ge=256, description="address-space limit of each worker process; a file "
                                                            "that needs more is quarantined, the run goes on")
    file_timeout_s: float = Field(120.0, gt=0, description="a file whose parsing takes longer is quarantined")

    @property
    def uses_synthetic_cohort(self) -> bool:
        """Neither a folder nor a PACS is named: ingest the embedded synthetic cohort (``medtl synth``)."""
        return self.input_dir is None and self.pacs is None

    @model_validator(mode="after")
    def _consistent(self) -> "IngestConfig":
        if self.input_dir is not None and self.pacs is not None:
            raise ValueError("ingest.input_dir and ingest.pacs are both set; keep one (a PACS pull is ingested "
                             "from <workdir>/pacs_incoming)")
        if self.worker_memory_mb < 3 * self.max_decoded_mib:
            # decoding peaks at 2-2.6x the decoded size: a smaller limit kills workers on files the budget admits
            raise ValueError(f"ingest.worker_memory_mb={self.worker_memory_mb} is below 3 x max_decoded_mib="
                             f"{self.max_decoded_mib}; raise worker_memory_mb or lower max_decoded_mib")
        return self


class AugmentConfig(StrictModel):
    """Random augmentation for training and self-supervised views; each part can be switched off
    because anatomy may forbid it (e.g. left-right flips swap the heart's side on a chest film)."""

    flip: bool = Field(False, description="random left-right flips")
    rotate_deg: float = Field(10.0, ge=0, le=180)
    scale: float = Field(0.1, ge=0, lt=1, description="random zoom range, +/- fraction")
    gamma: tuple[float, float] = Field((0.7, 1.5), description="random gamma range (intensity curve)")
    intensity: float = Field(0.1, ge=0, description="random intensity scaling, +/- fraction")
    noise_std: float = Field(0.03, ge=0)
    blur_sigma: tuple[float, float] = Field((0.25, 1.0))
    prob: float = Field(0.5, ge=0, le=1, description="probability of each photometric augmentation; blur gets half "
                                                     "of it, as blur can erase small findings")
    crop_min_scale: float = Field(0.4, gt=0, le=1, description="SSL views: smallest crop side, fraction of the image")


class DataConfig(StrictModel):
    """Which hospitals play which role, and how samples reach the model."""

    source_hospitals: list[str] = Field(default_factory=lambda: ["St. Aurelia General Hospital"], min_length=1,
                                        description="hospitals as the manifest names them: the alias "
                                                    "ingest.deid.site_aliases gives the site, else its keyed "
                                                    "site-... pseudonym")
    target_hospital: str | None = Field(
        "Harbor Valley Medical Center",
        description="the new hospital to adapt to, from its unlabeled images; null = a single-hospital study (no "
                    "adaptation: the fine-tuned model is deployed, every other hospital is external)")
    image_size: int = Field(64, ge=16, le=1024, description="model input size (square / cubic)")
    spatial_dims: Literal[2, 3] = 2
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.3, gt=0, lt=0.6)
    split_seed: int = 0
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _roles_disjoint(self) -> "DataConfig":
        if self.target_hospital in self.source_hospitals:
            raise ValueError(f"target_hospital {self.target_hospital!r} is also a source hospital; "
                             "pick a hospital that is not in source_hospitals")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10 % for training")
        return self


class TrainConfig(StrictModel):
    """Settings of the one training loop, shared by pretraining, fine-tuning and adaptation."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: int = Field(0, ge=0)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep an exponential moving average of the weights (decay per step, "
        "e.g. 0.99 for a few hundred steps, 0.999 for thousands); validation callbacks judge, and the run returns, "
        "the averaged weights. null = off")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 elsewhere")
    deterministic: bool = True
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="epochs between resumable checkpoints")
    progress: bool = True


class PretrainConfig(StrictModel):
    """Self-supervised contrastive pretraining on the unlabeled pool (``medtl pretrain``)."""

    method: Literal["simclr", "moco", "byol", "vicreg"] = Field(
        "simclr", description="SimCLR, MoCo v2 (momentum encoder + queue), BYOL or VICReg (medtl.ssl)")
    arch: str = "efficientnet_lite0"
    init: str | None = Field("efficientnet_lite0.imagenet",
                             description="backbone to start from (continued pretraining); null = random init")
    projection_dim: int = Field(128, ge=8)
    temperature: float = Field(0.2, gt=0)
    hospitals: list[str] | None = Field(
        None, description="hospitals whose images pretraining reads (labels unused); null = the source hospitals "
                          "and the target hospital. Whatever the list, images that are evaluated (the source "
                          "hospitals' test split, every labeled image of the other hospitals) are never read, and a "
                          "hospital listed here is no longer external: the report's data-use table says so")
    knn_every: int = Field(1, ge=1, description="epochs between k-NN accuracy checks on the labeled validation images")
    knn_k: int = Field(20, ge=1, description="neighbours of the k-NN monitor")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5, batch_size=64, lr=1e-3))

    @model_validator(mode="after")
    def _temperature_only_for_contrastive_methods(self) -> "PretrainConfig":
        if self.method in ("byol", "vicreg") and "temperature" in self.model_fields_set:
            raise ValueError(f"pretrain.temperature only applies to the contrastive methods simclr and moco; "
                             f"{self.method} has no softmax temperature: remove temperature or pick simclr / moco")
        return self


FinetuneStrategy = Literal["full", "linear_probe", "freeze", "gradual_unfreeze", "lp_ft", "l2sp", "lora"]
# Settings that belong to one strategy only: a non-default value under another strategy is an error.
_STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    "gradual_unfreeze": ("unfreeze_every",), "lp_ft": ("lp_epochs",), "l2sp": ("l2sp_alpha", "l2sp_beta"),
    "lora": ("lora_rank", "lora_alpha")}


class FinetuneConfig(StrictModel):
    """Supervised fine-tuning of the chosen backbone on the source hospitals (``medtl finetune``).

    ``strategy`` picks how (see :mod:`medtl.finetune`); every strategy runs through the one loop
    :func:`medtl.train.fit`, with freezing and layer-wise learning rates from
    :func:`medtl.finetune.optimizer_groups`. Settings of one strategy (``lora_rank``, ``lp_epochs``, ...) must
    keep their defaults under the others, so a forgotten switch fails loudly instead of being ignored.

    Backward compatibility: a config without ``strategy`` but with ``freeze_groups`` set (as written before
    strategies existed) means ``strategy: freeze`` (``freeze_groups: all`` means ``linear_probe``), which
    trains exactly as before.
    """

    backbone: str | None = Field(None, description="arch.tag to fine-tune; null = the selector's choice")
    strategy: FinetuneStrategy = Field(
        "full", description="full (every layer group), linear_probe (the classifier only), freeze (the first "
                            "freeze_groups groups frozen), gradual_unfreeze (ULMFiT: one more group every "
                            "unfreeze_every epochs), lp_ft (linear probe for lp_epochs, then full fine-tuning), "
                            "l2sp (full, weights pulled towards the pretrained ones), lora (low-rank adapters + "
                            "classifier)")
    freeze_groups: int | Literal["all"] = Field(0, description="strategy freeze: freeze the first k layer groups; "
                                                               "'all' = every group but the classifier")
    layer_decay: float = Field(1.0, gt=0, le=1, description="layer-wise learning-rate decay: group i of G trains "
                                                            "at lr x layer_decay^(G-1-i); 1 = one rate")
    batchnorm: Literal["train", "frozen", "adabn"] = Field(
        "train", description="BatchNorm statistics: train (follow the batches), frozen (keep the pretrained "
                             "ones), adabn (re-estimated once on the source training images, then kept)")
    unfreeze_every: int = Field(1, ge=1, description="strategy gradual_unfreeze: epochs between unfreezing groups")
    lp_epochs: int = Field(2, ge=1, description="strategy lp_ft: linear-probe epochs out of train.epochs; the "
                                                "rest fine-tune everything")
    l2sp_alpha: float = Field(0.01, ge=0, description="strategy l2sp: weight of the pull towards the "
                                                      "pretrained weights")
    l2sp_beta: float = Field(0.01, ge=0, description="strategy l2sp: weight of plain L2 on the classifier")
    lora_rank: int = Field(4, ge=1, description="strategy lora: rank of the adapters")
    lora_alpha: float = Field(8.0, gt=0, description="strategy lora: the update is scaled by lora_alpha / lora_rank")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better validation AUC and keep the best "
                                "epoch's weights; null = train every epoch")
    scratch_baseline: bool = Field(
        False, description="negative-transfer gate: also train <arch>.scratch (strategy full, same budget) and "
                           "compare validation AUC")
    on_negative_transfer: Literal["warn", "fallback"] = Field(
        "warn", description="when the gate finds scratch better: warn (keep the transferred model) or fallback "
                            "(the scratch model becomes the stage's model)")
    num_classes: int = Field(2, ge=2)
    class_weight: Literal["balanced"] | list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="weight of each class in the training loss: null = every image alike; balanced = inverse "
                          "class frequency in the source training split (scikit-learn's rule), so the 0.5 operating "
                          "point does not carry the training prevalence to other sites; or one weight per class")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=8, batch_size=32, lr=1e-3))

    @field_validator("freeze_groups")
    @classmethod
    def _non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("freeze_groups must be >= 0 or 'all'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _strategy_from_freeze_groups(cls, data: object) -> object:
        # Configs written before `strategy` existed froze groups with freeze_groups alone: keep their meaning.
        if isinstance(data, dict) and "strategy" not in data and data.get("freeze_groups", 0) not in (0, None):
            data = {**data, "strategy": "linear_probe" if data["freeze_groups"] == "all" else "freeze"}
        return data

    @model_validator(mode="after")
    def _settings_fit_strategy(self) -> "FinetuneConfig":
        s = self.strategy
        if s == "freeze" and self.freeze_groups == 0:
            raise ValueError("finetune.strategy 'freeze' needs freeze_groups >= 1 (or 'all'); set freeze_groups, "
                             "or use strategy: full to train every group")
        if s == "linear_probe" and self.freeze_groups not in (0, "all"):
            raise ValueError(f"finetune.strategy 'linear_probe' freezes every group but the classifier, but "
                             f"freeze_groups is {self.freeze_groups}; remove freeze_groups or use strategy: freeze")
        if s not in ("freeze", "linear_probe") and self.freeze_groups != 0:
            raise ValueError(f"finetune.freeze_groups={self.freeze_groups!r} only applies to strategy 'freeze', "
                             f"not {s!r}; set strategy: freeze, or remove freeze_groups")
        head_only = s == "linear_probe" or (s == "freeze" and self.freeze_groups == "all")
        if head_only and self.layer_decay != 1.0:
            raise ValueError("finetune.layer_decay has no effect when only the classifier trains (linear probe); "
                             "remove layer_decay or pick a strategy that trains the body")
        for owner, names in _STRATEGY_SETTINGS.items():
            for name in names:
                if s != owner and getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"finetune.{name}={getattr(self, name)!r} only applies to strategy {owner!r}, "
                                     f"not {s!r}; set strategy: {owner}, or remove {name}")
        if s == "lp_ft" and self.lp_epochs >= self.train.epochs:
            raise ValueError(f"finetune.strategy 'lp_ft' splits train.epochs={self.train.epochs} into lp_epochs="
                             f"{self.lp_epochs} linear-probe epochs and the rest fine-tuning; make lp_epochs smaller "
                             "than train.epochs")
        if isinstance(self.class_weight, list) and len(self.class_weight) != self.num_classes:
            raise ValueError(f"finetune.class_weight has {len(self.class_weight)} weights but num_classes is "
                             f"{self.num_classes}; give one weight per class, or use class_weight: balanced")
        if self.on_negative_transfer == "fallback" and not self.scratch_baseline:
            raise ValueError("finetune.on_negative_transfer 'fallback' needs the scratch model to fall back to; set "
                             "scratch_baseline: true, or on_negative_transfer: warn")
        return self


class SelectConfig(StrictModel):
    """Rank candidate backbones on the labeled source data (``medtl select``)."""

    candidates: list[str] = Field(
        default_factory=lambda: ["efficientnet_lite0.imagenet", "efficientnet_lite0.ssl", "efficientnet_lite0.scratch"],
        min_length=1)
    rank_by: Literal["logme", "h_score", "linear_probe_auc", "knn_accuracy", "leep", "nce"] = Field(
        "logme", description="the transferability score that orders candidates (medtl.select.scores)")
    cv_folds: int = Field(3, ge=2)
    validation: FinetuneConfig | None = Field(
        None, description="validation mode: also fine-tune every candidate with these settings (strategy, budget; "
                          "leave backbone null) and report, per score, the weighted Kendall tau against the "
                          "fine-tuned validation AUC, whether its pick is within `tolerance` of the best, and its "
                          "compute time next to fine-tuning's (select/validation.json). Costs one fine-tuning per "
                          "candidate. null = off")
    tolerance: float = Field(0.01, ge=0, description="validation mode: the loss of validation AUC against the best "
                                                     "fine-tuned candidate still counted as a good pick")
    target_aware: bool | None = Field(
        None, description="also score each candidate on the target hospital's unlabeled images (EnsV over the "
                          "candidates' source-trained linear probes, and the source-target distance of its "
                          "features) and rank by the mean of the source and target ranks (medtl.select."
                          "target_aware); null = on when data.target_hospital is set and has unlabeled images")

    @model_validator(mode="after")
    def _validation_fine_tunes_every_candidate(self) -> "SelectConfig":
        if self.validation is not None and self.validation.backbone is not None:
            raise ValueError(f"select.validation fine-tunes every candidate, so its backbone must stay null (got "
                             f"{self.validation.backbone!r}); list backbones in select.candidates instead")
        if self.validation is not None and self.validation.scratch_baseline:
            raise ValueError("select.validation.scratch_baseline: the negative-transfer gate belongs to the "
                             "fine-tune stage; add <arch>.scratch to select.candidates to compare against scratch")
        return self


class AdaptConfig(StrictModel):
    """Adapt the fine-tuned model to the target hospital without its labels (``medtl adapt``)."""

    methods: list[Literal["source_only", "adabn", "tent", "coral", "mmd", "dann", "ot", "pseudo_label"]] = Field(
        default_factory=lambda: ["source_only", "adabn", "coral"], min_length=1,
        description="source_only (the zero plugin), adabn (BatchNorm statistics re-estimated on the target), tent "
                    "(test-time entropy minimisation of BatchNorm affine parameters), or a loss plugin: coral, "
                    "mmd (multi-kernel), dann, ot (DeepJDOT optimal transport), pseudo_label (FixMatch-style)")
    reg: Annotated[float, Field(ge=0)] | list[Annotated[float, Field(ge=0)]] = Field(
        1.0, description="weight of the adaptation loss: total = task + reg * adaptation. A list trains every loss "
                         "plugin (coral, mmd, dann, ot, pseudo_label) once per value, as runs named "
                         "<method>-reg<value>; each run's epochs join the candidates that selection chooses from. "
                         "A wider pool is not a free win: on the shift benchmark, adding 0.3 to 1.0 doubled "
                         "EnsV's gap to the oracle on the hardest shift (docs/benchmarks.md)")
    # ensv by default: the one scorer that a confidently wrong candidate cannot fool (it disagrees with the
    # ensemble of the pool) and that needs no source validation images; entropy and snd give their best value to
    # a model that predicts one class for every target image, and dev / iwcv's density ratios degenerate when the
    # hospitals barely overlap or the source validation split is small (Hu et al., NeurIPS 2024 D&B)
    selection_scorer: Literal["ensv", "dev", "iwcv", "snd", "entropy"] = Field(
        "ensv", description="unsupervised scorer (medtl.select.unsupervised) whose pick among every (method, epoch) "
                            "candidate becomes the stage's chosen adapted model, adapt/chosen.safetensors: ensv "
                            "(agreement with the ensemble of all candidates), dev (deep embedded validation), iwcv, "
                            "snd (soft neighbourhood density) or entropy; all five are computed and reported either "
                            "way")
    label_shift: Literal["none", "bbse", "em"] = Field(
        "none", description="prior correction of the deployed model at the target hospital: the target's prevalence "
                            "is estimated from its unlabeled images, by black-box shift estimation (bbse, Lipton et "
                            "al. 2018) or maximum-likelihood EM on calibrated probabilities (em, Saerens et al. "
                            "2002; Alexandari et al. 2020), and the deployed probabilities there are re-weighted to "
                            "it; the operating threshold then reads the corrected probabilities. none = no "
                            "correction (the report shows both estimates either way)")
    plugin_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="each loss plugin's own settings, by method, e.g. {pseudo_label: "
        "{threshold: 0.9}, ot: {label_weight: 1.0}, dann: {alpha: 0.5}, mmd: {bandwidths: [0.5, 1, 2]}}; see "
        "medtl.adapt.plugin_settings. Unset settings keep the plugin's defaults")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=3, batch_size=32, lr=3e-4))

    @model_validator(mode="after")
    def _plugin_settings_fit_methods(self) -> "AdaptConfig":
        from medtl.adapt import build_adaptation_loss  # torch: only when a config sets plugin settings

        for method, settings in self.plugin_settings.items():
            if method not in self.methods:
                raise ValueError(f"adapt.plugin_settings has settings for {method!r}, which adapt.methods "
                                 f"{self.methods} does not run; add it to methods, or remove its settings")
            if method in ("adabn", "tent"):
                raise ValueError(f"adapt.plugin_settings.{method}: {method} is not a loss plugin and has no "
                                 "settings; remove them")
            try:
                build_adaptation_loss(method, 8, **settings)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"adapt.plugin_settings.{method}: {exc}") from exc
        return self

    @field_validator("reg")
    @classmethod
    def _distinct_reg_values(cls, reg: float | list[float]) -> float | list[float]:
        if isinstance(reg, list) and (not reg or len(set(reg)) != len(reg)):
            raise ValueError(f"reg: {reg} must list one or more distinct values, e.g. [0.3, 1.0]")
        return reg

    @property
    def reg_values(self) -> list[float]:
        """``reg`` as a list."""
        return list(self.reg) if isinstance(self.reg, list) else [self.reg]


class FewshotConfig(StrictModel):
    """Few-shot classification with prototypes on a backbone's embeddings (``medtl fewshot``)."""

    backbone: str | None = Field(None, description="arch.tag whose embeddings are used; null = the selector's choice")
    n_way: int = Field(2, ge=2, description="classes per episode")
    k_shots: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 5, 10], min_length=1,
        description="labeled (support) examples per class; each K is evaluated on its own episodes")
    n_query: int = Field(15, ge=1, description="query examples per class and episode")
    episodes: int = Field(600, ge=2, description="episodes per K and hospital (600 is the usual protocol)")
    metric: Literal["euclidean", "cosine"] = "euclidean"
    train: TrainConfig | None = Field(
        None, description="episodic training of the backbone (prototypical loss) on the source hospitals' training "
                          "split, with K = the largest of k_shots, before evaluation; null = the backbone as it is. "
                          "train.batch_size is not used: a batch is one episode")

    @field_validator("k_shots")
    @classmethod
    def _distinct_sorted(cls, k_shots: list[int]) -> list[int]:
        if len(set(k_shots)) != len(k_shots):
            raise ValueError(f"k_shots: {k_shots} lists a K twice; list each once, e.g. [1, 5, 10]")
        return sorted(k_shots)


REPORT_DEFAULT_MARKER = "[medtl default: replace with the site's own text]"
"""Starts every default intended-use / limitation text, so the report can flag text nobody has replaced yet."""

_DEFAULT_INTENDED_USE = (
    f"{REPORT_DEFAULT_MARKER} Research evaluation only. The model gives the probability that an image shows the "
    "finding it was trained to detect. It is meant to help a radiologist prioritise or double-check studies, not "
    "to make or exclude a diagnosis on its own, and only on the kind of equipment and patients this report covers.")
_DEFAULT_LIMITATIONS = (
    f"{REPORT_DEFAULT_MARKER} Retrospective evaluation on the hospitals listed in this report; performance on "
    "other equipment, protocols or patient groups is unknown until it is measured there.",
    f"{REPORT_DEFAULT_MARKER} Reference labels were used as given; how and by whom they were assigned, and how "
    "often they are wrong, is not assessed here.",
    f"{REPORT_DEFAULT_MARKER} Not evaluated prospectively or inside a clinical workflow: the effect on "
    "clinicians' decisions and on patients is unknown.",
)


class ReportConfig(StrictModel):
    """Per-hospital validation report (``medtl report``)."""

    n_bootstrap: int = Field(1000, ge=50)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    calibration_bins: int = Field(10, ge=2)
    title: str = "medtl validation report"
    intended_use: str = Field(_DEFAULT_INTENDED_USE, min_length=1,
                              description="who uses the model, on which patients, for what decision; the default "
                                          "is a placeholder the report flags until it is replaced")
    limitations: list[str] = Field(default_factory=lambda: list(_DEFAULT_LIMITATIONS),
                                   description="site-specific limitations, listed after the ones medtl derives "
                                               "from the run; the defaults are placeholders the report flags")
    failure_examples: int = Field(4, ge=0, le=12, description="most confident false positives and false "
                                                              "negatives shown, each")
    shift_images_per_site: int = Field(300, ge=10, description="images per hospital sampled for the shift "
                                                               "diagnostics (seeded)")
    pdf: bool = Field(True, description="also write report.pdf (skipped with a warning when no renderer works)")
    recalibrate: Literal["none", "temperature", "bcts"] = Field(
        "none", description="recalibrate the deployed model's probabilities on the source validation split: "
                            "temperature scaling (Guo et al. 2017) or bias-corrected temperature scaling (bcts, "
                            "Alexandari et al. 2020, which also corrects a prevalence the probabilities were "
                            "trained at, e.g. by finetune.class_weight: balanced); the threshold is chosen on the "
                            "recalibrated probabilities, so decisions do not change. The report shows each site's "
                            "ECE before and after. none = the network's own probabilities")
    leave_one_hospital_out: bool = Field(
        False, description="the pipeline also runs leave-one-hospital-out (medtl loho): for each hospital with "
                           "labeled images, fine-tune with the finetune section on all the others and test on it; "
                           "costs one extra fine-tuning per labeled hospital. The results go in the report's "
                           "leave-one-hospital-out section (it shows any loho/summary.json in the workdir)")


class TrackingConfig(StrictModel):
    """Experiment tracking (``medtl.tracking``): one MLflow run per pipeline run, with a nested run per stage
    holding the stage's config as parameters, its per-epoch metrics, its model weights and its report."""

    backend: Literal["mlflow", "none"] = Field(
        "none", description="mlflow (needs the optional extra: pip install 'medtl[tracking]') or none (nothing "
                            "is written and MLflow is never imported)")
    uri: str | None = Field(
        None, description="MLflow tracking URI, e.g. http://mlflow.example.org:5000; null = a local store under "
                          "<workdir>/mlruns (SQLite database mlflow.db and an artifacts/ folder). A server's "
                          "credentials come from MLflow's environment variables (MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), never from the YAML")
    experiment: str = Field("medtl", min_length=1, description="MLflow experiment the runs go to (created if "
                                                               "missing)")
    run_name: str | None = Field(None, description="name of the pipeline's run; default: the workdir's name")
    log_models: bool = Field(True, description="upload each stage's safetensors weights as artifacts (about 13 MB "
                                               "for efficientnet_lite0); false keeps only cards, metrics and "
                                               "reports")

    @model_validator(mode="after")
    def _consistent(self) -> "TrackingConfig":
        if self.backend == "none" and self.uri is not None:
            raise ValueError("tracking.uri is set but tracking.backend is 'none'; set backend: mlflow, or remove "
                             "uri")
        if self.uri is not None and "@" in self.uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("tracking.uri carries credentials (user:password@host); remove them and set "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                             "environment instead")
        return self


class OrchestrationConfig(StrictModel):
    """How the Prefect flows (``flows/``) run the stages: result persistence and caching, retries, fan-out.

    medtl itself never reads it: the CLI and :func:`medtl.stages.run_pipeline` behave the same whatever it says.
    """

    cache: bool = Field(True, description="skip a stage whose config section and input files (content hashes) "
                                          "are unchanged since it last finished; its result is read back from "
                                          "result_storage")
    result_storage: Path | None = Field(None, description="folder of persisted task results and cache records "
                                                          "(JSON); default <workdir>/.prefect-results, so "
                                                          "deleting the workdir also forgets its cache")
    retries: int = Field(2, ge=0, description="retries of the I/O stages (ingest, PACS pulls, ingest shards)")
    retry_delay_s: float = Field(10.0, gt=0, description="first retry delay; each later one doubles")
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="thread = Prefect's default in-process runner; dask = prefect-dask's DaskTaskRunner "
                              "(ingest shards and per-site evaluation fan out over its workers)")
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster (e.g. "
                                                       "tcp://10.0.0.5:8786, one started by dask-jobqueue on Slurm "
                                                       "or by dask-kubernetes); null = a LocalCluster on loopback")
    dask_workers: int = Field(2, ge=1, description="worker processes of the LocalCluster (dask_address unset)")
    ephemeral_startup_timeout_s: int = Field(
        180, ge=1, description="seconds `python -m flows.pipeline` waits for Prefect's ephemeral local server to start "
                               "(Prefect's own default is 20 s, which a busy 2-core node can exceed); the environment "
                               "variable PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, when set, wins")
    ingest_shards: int = Field(1, ge=1, description="split ingestion into this many shards of files, one task "
                                                    "each, merged into one manifest (2D only; 3D series are "
                                                    "ingested in one piece)")

    @model_validator(mode="after")
    def _consistent(self) -> "OrchestrationConfig":
        if self.dask_address is not None and self.task_runner != "dask":
            raise ValueError("orchestration.dask_address is set but task_runner is not 'dask'; set "
                             "task_runner: dask, or remove dask_address")
        return self


class PipelineConfig(StrictModel):
    """Everything one pipeline run needs. ``workdir`` holds every artifact of the run."""

    workdir: Path = Path("runs/demo")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _synthetic_site_aliases(self) -> "PipelineConfig":
        # without an alias the manifest names a site by its keyed pseudonym; the synthetic cohort's names are not PHI
        if self.ingest.uses_synthetic_cohort:  # copies: a section passed in may be shared with the caller
            aliases = {**self.synth.site_aliases(), **self.ingest.deid.site_aliases}
            deid = self.ingest.deid.model_copy(update={"site_aliases": aliases})
            self.ingest = self.ingest.model_copy(update={"deid": deid})
        return self

    @model_validator(mode="after")
    def _target_needed(self) -> "PipelineConfig":
        if self.data.target_hospital is None and self.select.target_aware:
            raise ValueError("select.target_aware scores candidates on the target hospital's unlabeled images, but "
                             "data.target_hospital is null; set a target hospital or select.target_aware: false")
        if self.data.target_hospital is None and self.adapt.label_shift != "none":
            raise ValueError(f"adapt.label_shift {self.adapt.label_shift!r} corrects the deployed model at the target "
                             "hospital, but data.target_hospital is null; set a target hospital or label_shift: none")
        return self


class ConfigError(ValueError):
    """A configuration file could not be read or does not validate."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Load a :class:`PipelineConfig` from YAML (defaults when ``path`` is None).

    Relative ``workdir`` / ``input_dir`` paths stay relative to the current directory.

    Raises:
        ConfigError: naming the file and the offending field.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/demo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of stage sections")
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        where = path if path is not None else "config"
        raise ConfigError(f"{where}: {exc}") from exc


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
