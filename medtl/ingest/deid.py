"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile, with options.

**Two profiles** (``ingest.deid.profile``). ``allow_list`` (the default) keeps only the attributes of
:data:`ALLOW_LIST` (what decoding the pixels, the geometry, the manifest and series assembly need; the
table in ``docs/deid_profile.md`` is printed from it by ``python -m medtl.ingest.deid``), the
attributes an enabled option keeps or cleans, and, empty, those the table empties (``Z``: type 2
attributes stay present); everything else is removed at any depth. ``annex_e`` applies Table E.1-1 as
a deny-list: attributes missing from the table are kept, except for the safety net below, so
descriptions, comments and code meanings survive (for those who need descriptors, with Clean
Descriptors). Both judge an element by the DICOM dictionary (its keyword and VR), never by the VR
written in the file: a patient name written as ``LO`` is a ``PN``; a public tag the dictionary does
not know is removed, whatever its VR and depth.

**The table.** Every attribute of PS3.15 Table E.1-1 gets the profile's action. The tag lists come from
``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`` (the table of the 2026c edition, one
list per action) rather than being typed here. Actions: ``X`` remove · ``Z`` empty value · ``D`` dummy
value · ``U`` keyed-hash UID · ``K`` keep · ``C`` clean (options only).

**Combined actions** (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) say "the first unless the
attribute's type in the IOD needs the next". medtl does not carry PS3.3's module tables, so it takes the
choice that keeps the object valid whatever the attribute's type is (see :data:`COMBINED`):
``X/Z`` → ``Z`` (type 2 or 3 stays valid), ``X/D``, ``Z/D``, ``X/Z/D`` → ``D`` (also valid for type 1),
``X/Z/U*`` → ``U*`` (the sequence is kept and cleaned recursively, its instance UIDs remapped). A dummy
carries no information: a fixed string for text VRs, a keyed pseudonym for ``PatientID``, a remapped UID
for ``UI``, an empty value for binary VRs and an empty sequence for ``SQ`` (a valid dummy item would
need the IOD's macro).

**Not in the table** (``annex_e``). Kept, as the profile says, except for a safety net by the
dictionary's value representation: person names are emptied, dates and times removed (or shifted /
kept with the temporal options), and every UID other than class ones (:data:`KEEP_UIDS`) remapped.
Group lengths, curves, overlays and comments (also in the table) are removed. Sequences are processed
recursively at any depth, so references (``ReferencedSOPInstanceUID``, ...) map exactly like the UIDs
they point to. In either profile a remapped attribute keeps its value only when it is a UID that
DICOM registers (PS3.6 Annex A: classes, transfer syntaxes, well-known instances); an instance UID
that merely starts with ``1.2.840.10008.`` is remapped like any other.

**Private elements** are removed except those in ``private_safe_list`` (private creator + element byte),
which are kept with their private creator; a safe-listed sequence has its items de-identified like
any other sequence.

**UIDs and PatientID** become an HMAC-SHA256 of the original under a secret key: the same input and key
give the same output in every run and batch (studies stay linked across incremental runs) while nobody
without the key can link them back.

**Options** (PS3.15 E.3; the attributes each one changes are listed below, per the table's column),
in either profile:

* Retain Longitudinal Temporal Information — *Modified Dates* (``longitudinal_temporal="shift"``):
  every date of a patient moves back by the same number of days, derived from a keyed hash of the
  original PatientID (stable across runs and batches; intervals kept); times of day are kept, DT
  offsets and partial precision are preserved. *Full Dates* (``"keep"``) keeps them. Patient's Birth
  Date/Time are not in these columns and stay under the basic action.
* Retain Patient Characteristics, Retain Device Identity, Retain Institution Identity: the columns'
  ``K`` attributes are kept, their ``C`` attributes cleaned.
* Clean Descriptors: descriptions and comments are kept with the patient's identifying strings (names,
  also with other separators between their components, IDs, addresses, the values of every removed
  text attribute), anything date-like (numeric dates, and dates with English month names or
  abbreviations, day-month-year or month-day-year), digit runs of five or more (IDs, phone numbers)
  and UIDs replaced by ``***``.

The result records what was done: PatientIdentityRemoved ``YES``, DeidentificationMethod,
DeidentificationMethodCodeSequence (CID 7050 codes of the profile and of each option applied) and
LongitudinalTemporalInformationModified.

Burned-in text in the pixels cannot be removed by header de-identification;
:func:`burned_in_annotation_risk` decides which images to quarantine (medtl does not clean pixels).

**Outputs that are not de-identified DICOM.** ``quarantine/`` holds byte-for-byte copies of the
rejected *original* files: it carries PHI by design and must be protected like the input. The
manifest's ``hospital`` column comes from the site attribute (InstitutionName by default) read
before de-identification, through :func:`site_label`: a site listed in ``site_aliases`` gets its
alias, every other one a keyed ``site-…`` pseudonym, so the institution's name never reaches an
output. The ledger's ``path`` column repeats the input's relative file paths, so input file and
folder names must not identify patients.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _annex_e
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, UID_dictionary

if TYPE_CHECKING:
    from medtl.config import DeidConfig

DEVELOPMENT_KEY = b"medtl-development-key-not-for-real-data"
"""Key used when no secret is configured: fine for the synthetic cohort, never for real data."""

TABLE_EDITION = "2026c"
MAX_UID_LENGTH = 64
SCRUBBED = "***"

COMBINED: dict[str, str] = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}
"""How each combined action of the table is resolved (see the module docstring)."""

_TABLE_LISTS = {"D": "D_TAGS", "Z": "Z_TAGS", "X": "X_TAGS", "U": "U_TAGS", "Z/D": "Z_D_TAGS",
                "X/Z": "X_Z_TAGS", "X/D": "X_D_TAGS", "X/Z/D": "X_Z_D_TAGS", "X/Z/U*": "X_Z_U_STAR_TAGS"}


def _load_table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 as ``{tag: action}`` plus the masked entries (curves ``50xx``, overlays ``60xx``)."""
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for action, name in _TABLE_LISTS.items():
        for entry in getattr(_annex_e, name):
            if len(entry) == 2:
                exact[Tag(*entry)] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append((group, element, group_mask, element_mask, action))
    return exact, tuple(masked)


TABLE, _MASKED = _load_table()
"""``TABLE``: tag → the basic profile's action as the standard writes it (``"X/Z"`` included)."""


def _tags(*keywords: str) -> frozenset[int]:
    tags = {tag_for_keyword(k) for k in keywords}
    if None in tags:  # a typo here would silently disable part of an option
        raise RuntimeError(f"unknown DICOM keyword in {keywords}")
    return frozenset(Tag(t) for t in tags)


# Table E.1-1, column "Rtn. Pat. Chars. Opt.": K
PATIENT_CHARACTERISTICS_KEEP = _tags(
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "EthnicGroupCodeSequence",
    "PatientSexNeutered", "PregnancyStatus", "SmokingStatus")
# Table E.1-1, column "Rtn. Pat. Chars. Opt.": C
PATIENT_CHARACTERISTICS_CLEAN = _tags("Allergies", "PatientState", "PreMedication", "SpecialNeeds")
# Table E.1-1, column "Rtn. Dev. Id. Opt.": K
DEVICE_IDENTITY = _tags(
    "CassetteID", "DetectorID", "DeviceSerialNumber", "DeviceUID", "GantryID", "GeneratorID",
    "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence", "PerformedStationName",
    "PerformedStationNameCodeSequence", "PlateID", "ScheduledProcedureStepLocation", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName", "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "SourceSerialNumber", "StationName")
# Table E.1-1, column "Rtn. Inst. Id. Opt.": K
INSTITUTION_IDENTITY = _tags(
    "InstitutionAddress", "InstitutionCodeSequence", "InstitutionName", "InstitutionalDepartmentName",
    "InstitutionalDepartmentTypeCodeSequence")
# Table E.1-1, column "Clean Desc. Opt.": C
DESCRIPTORS = _tags(
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "AdditionalPatientHistory", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "Allergies",
    "CommentsOnThePerformedProcedureStep", "ContrastBolusAgent", "ContributionDescription",
    "DerivationDescription", "DischargeDiagnosisDescription", "FrameComments", "IdentifyingComments",
    "ImageComments", "ImagingServiceRequestComments", "Impressions", "InterpretationDiagnosisDescription",
    "InterpretationText", "MedicalAlerts", "Occupation", "PatientComments", "PatientState",
    "PerformedProcedureStepDescription", "ProtocolName", "ReasonForTheImagingServiceRequest", "ReasonForStudy",
    "RequestAttributesSequence", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureDescription", "ResultsComments", "ScheduledProcedureStepDescription",
    "SeriesDescription", "ServiceEpisodeDescription", "StudyComments", "StudyDescription", "VisitComments")
# Columns "Rtn. Long. Full Dates Opt." (K) and "Rtn. Long. Modif. Dates Opt." (C): every date and time
# attribute, except these two, which stay under the basic action (age is a patient characteristic).
_NOT_TEMPORAL_OPTION = _tags("PatientBirthDate", "PatientBirthTime")

KEEP_UIDS = _tags("SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                  "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
                  "MappingResourceUID", "ContextUID", "AffectedSOPClassUID", "RequestedSOPClassUID",
                  "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID", "SOPClassesInStudy",
                  "ReferencedSOPClassUIDInFile", "ReferencedTransferSyntaxUIDInFile",
                  "ReferencedRelatedGeneralSOPClassUIDInFile", "PrivateInformationCreatorUID")
"""UIDs that name classes, syntaxes or schemes, not instances: never remapped."""

PROFILES = ("allow_list", "annex_e")
"""``allow_list``: keep only :data:`ALLOW_LIST` (and what the options retain); ``annex_e``: Table E.1-1 as a
deny-list, everything it does not list kept (see the module docstring)."""

ALLOW_LIST_GROUPS: dict[str, tuple[str, ...]] = {
    "image pixel module: decoding the stored pixels, and the burned-in text checks": (
        "SpecificCharacterSet", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
        "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio", "NumberOfFrames",
        "FrameIncrementPointer", "SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue",
        "PixelPaddingRangeLimit", "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
        "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "LossyImageCompression", "LossyImageCompressionRatio",
        "LossyImageCompressionMethod", "BurnedInAnnotation", "RecognizableVisualFeatures"),
    "geometry: pixel spacing for the manifest, slice positions and orientations for volumes (also per frame)": (
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness",
        "SpacingBetweenSlices", "SliceLocation", "PatientPosition", "PatientOrientation", "FrameOfReferenceUID",
        "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "PlanePositionSequence",
        "PlaneOrientationSequence", "PixelMeasuresSequence", "FrameContentSequence", "TemporalPositionIndex",
        "StackID", "InStackPositionNumber", "DimensionIndexValues", "FrameAcquisitionNumber"),
    "pixel value transforms: stored values to modality units and display windows": (
        "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
        "VOILUTSequence", "ModalityLUTSequence", "LUTDescriptor", "LUTData", "ModalityLUTType",
        "PresentationLUTShape", "PixelValueTransformationSequence", "FrameVOILUTSequence",
        "PixelIntensityRelationship", "PixelIntensityRelationshipSign"),
    "acquisition: the manifest's vendor, model, modality, view and body part, and series assembly": (
        "Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ViewPosition", "ImageLaterality",
        "Laterality", "PresentationIntentType", "ImageType", "SeriesNumber", "InstanceNumber", "AcquisitionNumber",
        "TemporalPositionIdentifier", "NumberOfTemporalPositions", "EchoNumbers", "EchoTime", "EffectiveEchoTime",
        "MREchoSequence", "RepetitionTime", "InversionTime", "EchoTrainLength", "FlipAngle",
        "MagneticFieldStrength", "ImagingFrequency", "ScanningSequence", "SequenceVariant", "ScanOptions",
        "MRAcquisitionType", "InPlanePhaseEncodingDirection", "DiffusionBValue", "DiffusionDirectionality",
        "DiffusionGradientOrientation", "MRDiffusionSequence", "DiffusionGradientDirectionSequence",
        "ConvolutionKernel", "KVP", "ExposureTime", "XRayTubeCurrent", "Exposure", "ExposureInuAs",
        "DistanceSourceToDetector", "DistanceSourceToPatient", "FilterType", "Grid", "FocalSpots",
        "AnodeTargetMaterial", "DetectorType"),
    "identity of the image, under keyed pseudonyms: linking images, series and studies": (
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"),
    "the de-identification record (rewritten by medtl)": (
        "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified"),
}
"""The default profile's allow-list, by reason: the one declaration of what it keeps."""

ALLOW_LIST: frozenset[int] = frozenset().union(*(_tags(*keywords) for keywords in ALLOW_LIST_GROUPS.values()))
"""Tags the ``allow_list`` profile keeps, at any depth (each under its basic action: UIDs remapped, ...)."""

CID_7050: dict[str, tuple[str, str]] = {
    "profile": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "keep": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "shift": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "private_safe_list": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
"""DICOM PS3.16 CID 7050 "De-identification Method" codes (scheme DCM) that medtl can apply."""

BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "SC", "OT", "XA", "RF", "ES", "XC", "GM", "OP", "PX", "DOC"})
"""Modalities whose images commonly carry burned-in text (ultrasound, secondary capture and other,
angiography and fluoroscopy, endoscopy, visible-light photography and microscopy, ophthalmic photos,
panoramic dental X-ray, scanned documents): without a BurnedInAnnotation NO they are quarantined."""
_SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DATE_TIME_VRS = frozenset({"DA", "DT", "TM"})
_DUMMIES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y", "IS": "0", "DS": "0",
            "PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "CS": "ANONYMIZED", "LT": "ANONYMIZED",
            "ST": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "AE": "ANONYMIZED"}
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
_MONTH = (r"(?<![a-z])(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?(?![a-z])")
_DAY = r"(?<!\d)\d{1,2}(?:st|nd|rd|th)?(?![\d])"
_YEAR = r"(?:'?\d{2}|\d{4})(?!\d)"
_PATTERNS = re.compile("|".join((
    r"\d+(?:\.\d+){3,}",                                   # UIDs
    r"\d{4}[-./]\d{1,2}[-./]\d{1,2}",                      # 2020-01-31
    r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4}",                    # 31.01.2020, 1/31/20
    rf"{_DAY}[\s./-]*(?:of\s+)?{_MONTH}(?:[\s,./-]*{_YEAR})?",  # 17-Apr-2023, 4 July 1960, 17 April
    rf"{_MONTH}[\s,./-]*(?:{_DAY}(?:[\s,./-]*{_YEAR})?|\d{{4}}(?!\d))",  # April 17, 2023; Apr 2023
    r"(?:\+|\b)\d[\d ()-]{5,}\d",                           # phone numbers, IDs with separators
    r"\d{5,}",                                             # IDs, compact dates
)), re.IGNORECASE)
_MIN_IDENTIFIER_LENGTH = 3


@dataclass(frozen=True)
class DeidOptions:
    """Which PS3.15 E.3 options to apply on top of the basic profile (picklable, for worker processes).

    Attributes:
        profile: ``"allow_list"`` (keep only :data:`ALLOW_LIST`) or ``"annex_e"`` (Table E.1-1 as a deny-list).
        longitudinal_temporal: ``"remove"`` (basic), ``"shift"`` (Modified Dates) or ``"keep"`` (Full Dates).
        date_shift_max_days: with ``"shift"``, each patient's dates move back by 1..this many days.
        retain_device_identity, retain_institution_identity, retain_patient_characteristics,
        clean_descriptors: the options of the same names.
        private_safe_list: ``(group, private creator, element byte)`` of private elements to keep.
    """

    profile: str = "allow_list"
    longitudinal_temporal: str = "remove"
    date_shift_max_days: int = 3650
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    private_safe_list: frozenset[tuple[int, str, int]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile {self.profile!r} must be one of {PROFILES}")
        if self.longitudinal_temporal not in ("remove", "shift", "keep"):
            raise ValueError(f"longitudinal_temporal {self.longitudinal_temporal!r} must be remove, shift or keep")
        if self.date_shift_max_days < 1:
            raise ValueError(f"date_shift_max_days must be >= 1, got {self.date_shift_max_days}")

    @classmethod
    def from_config(cls, cfg: DeidConfig) -> DeidOptions:
        """The options of an ``ingest.deid`` config section.

        Args:
            cfg: the config (its ``private_safe_list`` entries are already validated).

        Returns:
            The options.
        """
        rules = set()
        for rule in cfg.private_safe_list:
            group, creator, element = (p.strip() for p in rule.split(","))
            rules.add((int(group, 16), creator, int(element, 16)))
        return cls(profile=cfg.profile, longitudinal_temporal=cfg.longitudinal_temporal,
                   date_shift_max_days=cfg.date_shift_max_days,
                   retain_device_identity=cfg.retain_device_identity,
                   retain_institution_identity=cfg.retain_institution_identity,
                   retain_patient_characteristics=cfg.retain_patient_characteristics,
                   clean_descriptors=cfg.clean_descriptors, private_safe_list=frozenset(rules))

    def method_codes(self) -> list[tuple[str, str]]:
        """CID 7050 ``(code value, code meaning)`` of the profile and of every option applied, in code order."""
        names = ["profile", *(n for n in ("clean_descriptors", "retain_patient_characteristics",
                                          "retain_device_identity", "retain_institution_identity")
                              if getattr(self, n))]
        if self.longitudinal_temporal != "remove":
            names.append(self.longitudinal_temporal)
        if self.private_safe_list:
            names.append("private_safe_list")
        return sorted(CID_7050[n] for n in names)


BASIC = DeidOptions()


def resolve_secret(cfg: DeidConfig) -> bytes:
    """The key for UID, patient-ID and date-shift hashing.

    Args:
        cfg: ``deid`` config; ``uid_secret`` wins over the environment variable ``uid_secret_env``.

    Returns:
        The key. Without either, :data:`DEVELOPMENT_KEY` with a warning.
    """
    secret = cfg.uid_secret or os.environ.get(cfg.uid_secret_env)
    if secret:
        return secret.encode()
    warnings.warn(f"no de-identification key: neither ingest.deid.uid_secret nor ${cfg.uid_secret_env} is set, "
                  "so the public development key is used and pseudonyms can be reversed by anyone with the "
                  f"original UIDs; set ${cfg.uid_secret_env} to a long random secret for real data",
                  UserWarning, stacklevel=2)
    return DEVELOPMENT_KEY


def check_uid_root(uid_root: str) -> None:
    """Make sure remapped UIDs under ``uid_root`` are valid (digits and dots, at most 64 characters).

    Args:
        uid_root: e.g. ``"2.25"``.

    Raises:
        ValueError: naming ``ingest.deid.uid_root``.
    """
    parts = uid_root.split(".")
    if not all(p.isdigit() and (p == "0" or not p.startswith("0")) for p in parts):
        raise ValueError(f"ingest.deid.uid_root {uid_root!r} is not a UID root (digits separated by dots, "
                         "no leading zeros); use 2.25 or your organisation's registered root")
    if len(uid_root) + 1 + 39 > MAX_UID_LENGTH:
        raise ValueError(f"ingest.deid.uid_root {uid_root!r} is too long: remapped UIDs append up to 39 digits "
                         f"and must stay within {MAX_UID_LENGTH} characters; use a root of at most 24 characters")


def remap_uid(uid: str, key: bytes, uid_root: str = "2.25") -> str:
    """Keyed, deterministic replacement of a UID.

    Args:
        uid: the original UID.
        key: the secret from :func:`resolve_secret`.
        uid_root: root of the new UID.

    Returns:
        ``uid_root + "." + int(HMAC-SHA256(key, uid)[:16])``.
    """
    digest = hmac.new(key, uid.encode(), hashlib.sha256).digest()
    return f"{uid_root}.{int.from_bytes(digest[:16], 'big')}"


def pseudonymise_patient_id(patient_id: str, key: bytes) -> str:
    """Keyed, deterministic pseudonym of a patient ID (``"P"`` + 12 hex digits).

    Args:
        patient_id: the original ID.
        key: the secret from :func:`resolve_secret`.

    Returns:
        The pseudonym.
    """
    # the prefix separates this hash from UID hashes, so a pseudonym never equals a remapped UID
    return "P" + hmac.new(key, b"PatientID\x00" + patient_id.encode(), hashlib.sha256).hexdigest()[:12]


def date_shift_days(patient_key: str, key: bytes, max_days: int) -> int:
    """The patient's date shift for the Modified Dates option: the same for every run and batch.

    Args:
        patient_key: the original PatientID (or, without one, the StudyInstanceUID).
        key: the secret from :func:`resolve_secret`; without it the shift cannot be recomputed.
        max_days: largest shift.

    Returns:
        A negative number of days in ``[-max_days, -1]`` (never 0: no date survives unshifted).
    """
    digest = hmac.new(key, b"DateShift\x00" + patient_key.encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % max_days)


def site_label(raw_site: str, aliases: dict[str, str], key: bytes) -> str:
    """The hospital label written to the manifest for a raw site value.

    The label must name the site (validation is per hospital), but it is the one place where a value
    read before de-identification reaches the outputs, so the raw value never does: listed sites get
    their alias, every other one (all of them when no aliases are configured) a keyed pseudonym. The
    same holds for whatever names a site in place of the attribute (e.g. the input's first folder).

    Args:
        raw_site: the value of ``ingest.site_attribute`` in the original file, or its stand-in (may be empty).
        aliases: ``ingest.deid.site_aliases``.
        key: the secret from :func:`resolve_secret`.

    Returns:
        The alias; ``"site-"`` + 10 hex digits for a site missing from ``aliases``; ``""`` for an empty
        value (the caller picks a stand-in and labels it through this function too).
    """
    raw_site = raw_site.strip()
    if not raw_site:
        return ""
    if raw_site in aliases:
        return aliases[raw_site]
    return "site-" + hmac.new(key, b"Site\x00" + raw_site.encode(), hashlib.sha256).hexdigest()[:10]


def burned_in_annotation_risk(ds: Dataset, pixels_cleaned: bool) -> str | None:
    """Why an image must be quarantined because its pixels may show identifying text or features.

    PS3.15 E.1.1 puts burned-in text outside what header de-identification removes. An image is at risk
    when BurnedInAnnotation (0028,0301) or RecognizableVisualFeatures (0028,0302) is YES, or when
    BurnedInAnnotation is absent and the modality is one of :data:`BURNED_IN_MODALITIES` (or the SOP
    class is a Secondary Capture). medtl does not clean pixels; ``pixels_cleaned`` states that this was
    done before ingestion.

    Args:
        ds: the original dataset.
        pixels_cleaned: ``ingest.deid.pixels_cleaned_upstream``.

    Returns:
        The quarantine reason, naming the attribute, or None when the image may be ingested.
    """
    if pixels_cleaned:
        return None
    fix = "; clean the pixels and set ingest.deid.pixels_cleaned_upstream, or leave the file out"
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if burned_in == "YES":
        return "BurnedInAnnotation (0028,0301) is YES: the pixels may show identifying text" + fix
    if str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper() == "YES":
        return "RecognizableVisualFeatures (0028,0302) is YES: the image may show the patient's face" + fix
    if burned_in:
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    secondary_capture = str(ds.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE_ROOT)
    if modality in BURNED_IN_MODALITIES or secondary_capture:
        what = f"Modality {modality}" if modality in BURNED_IN_MODALITIES else "a Secondary Capture SOP class"
        return (f"BurnedInAnnotation (0028,0301) is missing and {what} commonly carries burned-in text" + fix)
    return None


def dictionary_vr(tag: BaseTag, written_vr: str | None = None) -> str | None:
    """The VR by which an element is judged: the DICOM dictionary's, never the one written in the file.

    Args:
        tag: a public tag.
        written_vr: the VR in the file (None for implicit VR); it only picks among the dictionary's
            alternatives (``US or SS``, ``OB or OW``).

    Returns:
        The VR, or None for a tag the dictionary does not know (such elements are removed).
    """
    try:
        alternatives = dictionary_VR(tag).split(" or ")
    except KeyError:
        return None
    return written_vr if written_vr in alternatives else alternatives[0]


def action_for(tag: BaseTag, options: DeidOptions = BASIC) -> str:
    """The action for one public element, judged by its tag: the options' columns, then the profile.

    ``allow_list``: a tag outside :data:`ALLOW_LIST` is removed, or emptied where the table empties it.
    Then (both profiles) Table E.1-1, then rules by the dictionary's VR.

    Args:
        tag: the element's tag.
        options: the options applied (``options.profile`` included).

    Returns:
        ``"X"`` remove, ``"Z"`` empty, ``"D"`` dummy, ``"U"`` remap UIDs, ``"U*"`` keep the sequence and
        clean its items, ``"K"`` keep (sequences: clean their items) or ``"C"`` clean (dates: shift;
        text: scrub; sequences: clean their items).
    """
    vr = dictionary_vr(tag)
    if tag.element == 0x0000 or vr is None:
        return "X"  # group lengths are wrong once anything in the group changes; unknown tags are unjudgeable
    if options.retain_institution_identity and tag in INSTITUTION_IDENTITY:
        return "K"
    if options.retain_device_identity and tag in DEVICE_IDENTITY:
        return "K"
    if options.retain_patient_characteristics:
        if tag in PATIENT_CHARACTERISTICS_KEEP:
            return "K"
        if tag in PATIENT_CHARACTERISTICS_CLEAN:
            return "C"
    if options.clean_descriptors and tag in DESCRIPTORS:
        return "C"
    if vr in _DATE_TIME_VRS and options.longitudinal_temporal != "remove" and tag not in _NOT_TEMPORAL_OPTION:
        return "K" if options.longitudinal_temporal == "keep" else "C"
    action = TABLE.get(tag) or next((a for g, e, gm, em, a in _MASKED
                                     if tag.group & gm == g and tag.element & em == e), None)
    action = COMBINED.get(action, action)
    if options.profile == "allow_list" and tag not in ALLOW_LIST:
        return "Z" if action == "Z" else "X"  # an empty value carries nothing and keeps type 2 attributes
    if action is not None:
        return action
    if vr == "UI":
        return "K" if tag in KEEP_UIDS else "U"
    if vr == "PN":
        return "Z"
    if vr in _DATE_TIME_VRS:
        return "X"
    return "K"


_action = functools.lru_cache(maxsize=8192)(action_for)  # the same few hundred tags in every file
_vr = functools.lru_cache(maxsize=8192)(dictionary_vr)


def allow_list_table(options: DeidOptions = BASIC) -> str:
    """The markdown table of ``docs/deid_profile.md``: each attribute :data:`ALLOW_LIST` keeps, and why.

    Args:
        options: the options whose actions the table shows (default: the default profile alone).

    Returns:
        One row per attribute (tag, keyword, action, reason), in the order of :data:`ALLOW_LIST_GROUPS`.
    """
    rows = ["| Attribute | Keyword | Action | Reason |", "|---|---|---|---|"]
    for reason, keywords in ALLOW_LIST_GROUPS.items():
        for keyword in keywords:
            tag = Tag(keyword)
            rows.append(f"| ({tag.group:04X},{tag.element:04X}) | {keyword_for_tag(tag)} | "
                        f"{_ACTION_NAMES[action_for(tag, options)]} | {reason} |")
    return "\n".join(rows) + "\n"


_ACTION_NAMES = {"K": "K keep", "U": "U remapped UID", "D": "D keyed pseudonym", "Z": "Z emptied", "X": "X removed",
                 "C": "C cleaned", "U*": "U* items cleaned"}


def deidentify(ds: Dataset, key: bytes, uid_root: str = "2.25", *, options: DeidOptions = BASIC) -> Dataset:
    """Return a de-identified copy of ``ds``; the input is not modified.

    The copy is built element by element instead of deep-copied (which dominated ingestion time):
    changed elements are new objects, unchanged ones (pixel data included) are shared with ``ds``.
    Replace elements of either dataset rather than mutating them in place.

    Args:
        ds: the original dataset (with or without file meta).
        key: the secret from :func:`resolve_secret`.
        uid_root: root of remapped UIDs.
        options: the PS3.15 options to apply (default: the basic profile alone).

    Returns:
        The de-identified dataset with fresh file meta, PatientIdentityRemoved, DeidentificationMethod,
        DeidentificationMethodCodeSequence and LongitudinalTemporalInformationModified.
    """
    ctx = _Context(key=key, uid_root=uid_root, options=options, shift=_patient_shift(ds, key, options),
                   identifiers=_identifiers(ds, options) if _scrubs(options) else ())
    out = _clean(ds, ctx)
    original_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = original_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    out.file_meta = meta
    shifted = options.longitudinal_temporal == "shift" and ctx.shift is not None
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = _method_description(shifted, options.profile)
    codes = []
    for value, meaning in options.method_codes():
        if value == CID_7050["shift"][0] and not shifted:
            continue  # no PatientID or StudyInstanceUID to key a shift on: the dates were removed instead
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    temporal = options.longitudinal_temporal
    out.LongitudinalTemporalInformationModified = (
        "UNMODIFIED" if temporal == "keep" else "MODIFIED" if shifted else "REMOVED")
    return out


def _method_description(shifted: bool, profile: str) -> list[str]:
    """DeidentificationMethod (LO, 64 characters a value, VM 1-n); the options are in the code sequence."""
    values = [f"DICOM PS3.15 E.1.1 basic profile, table {TABLE_EDITION}", "UIDs, PatientID by HMAC-SHA256"]
    if profile == "allow_list":
        values.append("allow-list: only pixel, geometry, acquisition attributes kept")
    if shifted:
        values.append("dates shifted by a keyed per-patient offset")
    return values


@dataclass(frozen=True)
class _Context:
    key: bytes
    uid_root: str
    options: DeidOptions
    shift: int | None  # days; None: no basis for a shift, dates are removed
    identifiers: tuple[re.Pattern, ...]


def _patient_shift(ds: Dataset, key: bytes, options: DeidOptions) -> int | None:
    if options.longitudinal_temporal != "shift":
        return None
    # without a PatientID one shift per study keeps the study's intervals; with neither, dates go
    basis = str(ds.get("PatientID", "") or "").strip() or str(ds.get("StudyInstanceUID", "") or "").strip()
    return date_shift_days(basis, key, options.date_shift_max_days) if basis else None


def _scrubs(options: DeidOptions) -> bool:
    return options.clean_descriptors or options.retain_patient_characteristics


def _identifiers(ds: Dataset, options: DeidOptions) -> tuple[re.Pattern, ...]:
    """Whole-word, case-insensitive patterns of the identifying strings in ``ds``, longest first.

    Collected: every person name anywhere in the dataset (each component, and family and given name
    together in either order with any separators or none between them: ``Doe_Jane``, ``Jane Doe``), and
    the values of every text or date element that the profile removes, empties or replaces (with
    ``^``-separated components, e.g. of addresses). Free-text values are taken whole, not split into
    words. A word ends at anything but a letter or digit, so ``_`` separates words too.
    """
    found: set[str] = set()  # regular expressions
    for elem in _walk(ds):
        if elem.VR == "SQ" or elem.tag.is_private or not elem.value:
            continue
        vr = _vr(elem.tag, elem.VR) or elem.VR  # a tag the dictionary does not know is removed: its value counts
        if vr == "PN":
            for value in _values(elem):
                parts = [p for p in re.split(r"[\^=\s]+", str(value)) if p]
                found.update(re.escape(p) for p in parts if len(p) >= _MIN_IDENTIFIER_LENGTH)
                if len(parts) >= 2:
                    family, given = re.escape(parts[0]), re.escape(parts[1])
                    found.update((rf"{family}[\W_]*{given}", rf"{given}[\W_]*{family}"))
            continue
        if vr not in _TEXT_VRS | _DATE_TIME_VRS or _action(elem.tag, options) not in ("X", "Z", "D"):
            continue
        for value in _values(elem):
            words = {str(value), *(str(value).split("^") if vr in ("LO", "SH") else ())}
            found.update(re.escape(w.strip()) for w in words if len(w.strip()) >= _MIN_IDENTIFIER_LENGTH)
    return tuple(re.compile(rf"(?<![^\W_]){w}(?![^\W_])", re.IGNORECASE)
                 for w in sorted(found, key=len, reverse=True))


def _walk(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _values(elem: DataElement) -> list:
    return list(elem.value) if elem.VM > 1 else [elem.value]


def scrub_text(text: str, identifiers: Iterable[re.Pattern]) -> str:
    """The Clean Descriptors cleaning of one text value.

    Args:
        text: a description or comment.
        identifiers: whole-word patterns of the patient's identifying strings (see :func:`deidentify`).

    Returns:
        ``text`` with each identifier, anything date-like (``2023-04-17``, ``17-Apr-2023``, ``April 17,
        2023``, ``4 July 1960``), UIDs and digit runs of five or more replaced by ``***``.
    """
    for pattern in identifiers:
        text = pattern.sub(SCRUBBED, text)
    return _PATTERNS.sub(SCRUBBED, text)


def shift_date(value: str, vr: str, days: int) -> str | None:
    """Move one DA or DT value by ``days``, keeping its precision, time of day and UTC offset.

    Args:
        value: the DICOM value (``YYYYMMDD``; DT ``YYYY[MM[DD[HH...]]][&ZZXX]``; legacy ``YYYY.MM.DD``).
        vr: ``"DA"`` or ``"DT"`` (``"TM"`` values are returned unchanged: a whole-day shift keeps times).
        days: the shift.

    Returns:
        The shifted value, or None when the value is not a date (the caller removes it).
    """
    value = value.strip()
    if vr == "TM" or not value:
        return value
    if vr == "DA":
        value = value.replace(".", "") if re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", value) else value
        date = _parse_date(value[:8]) if re.fullmatch(r"\d{8}", value) else None
        return None if date is None else (date + dt.timedelta(days=days)).strftime("%Y%m%d")
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?(\d{0,6}(?:\.\d{1,6})?)?([+-]\d{4})?", value)
    if match is None:
        return None
    year, month, day, rest, offset = match.groups()
    # a partial date is shifted from the middle of its period and written back at its own precision
    base, width = ((f"{year}0701", 4) if month is None else (f"{year}{month}15", 6) if day is None
                   else (f"{year}{month}{day}", 8))
    date = _parse_date(base)
    if date is None:
        return None
    return (date + dt.timedelta(days=days)).strftime("%Y%m%d")[:width] + (rest or "") + (offset or "")


def _parse_date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def _clean(ds: Dataset, ctx: _Context) -> Dataset:
    # Kept elements are copied still encoded, straight into the new dataset's dict (Dataset.__setitem__ costs
    # more than the rest of the work on them): with the same encoding the writer emits their bytes as they are.
    kept: dict[BaseTag, object] = {}
    changed: list[DataElement] = []
    for tag, raw in ds.items():
        if tag.group & 1:  # private
            if not _safe_private(ds, tag, ctx.options.private_safe_list):
                continue
            if _written_as_sequence(raw):  # its items are de-identified like those of any other sequence
                elem = ds[tag]
                if elem.VR == "SQ":
                    changed.append(DataElement(tag, "SQ", Sequence([_clean(item, ctx) for item in elem.value])))
            elif not _encoded_items(raw):  # items hidden in a UN value cannot be cleaned: removed
                kept[tag] = raw
            continue
        vr = _vr(tag, raw.VR)
        action = _action(tag, ctx.options)
        # a value that is not the structure its tag says (items under a text tag, ...) cannot be judged
        if action == "X" or (vr != "SQ" and _written_as_sequence(raw)):
            continue
        if action == "K" and vr != "SQ":
            kept[tag] = raw
            continue
        elem = _apply(ds[tag], vr, action, ctx)
        if elem is not None:
            changed.append(elem)
    # an item inherits its character set: telling it so keeps its elements raw for the writer, not re-encoded
    out = Dataset(kept, parent_encoding=ds.original_character_set or default_encoding)
    implicit, little = ds.original_encoding
    if little is not None:
        out.set_original_encoding(implicit, little, ds.original_character_set)
    for elem in changed:  # through __setitem__, which links sequences and private creators to their dataset
        out[elem.tag] = elem
    return out


_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000) little and big endian


def _written_as_sequence(raw: object) -> bool:
    """Whether the file stores an element as a sequence (VR SQ, or an undefined length outside PixelData)."""
    return raw.VR == "SQ" or (getattr(raw, "length", 0) == _UNDEFINED_LENGTH and raw.tag != 0x7FE00010)


def _encoded_items(raw: object) -> bool:
    """Whether an element read as UN holds an encoded sequence (its value starts with an item tag)."""
    value = raw.value
    return raw.VR == "UN" and isinstance(value, bytes) and value[:4] in _ITEM_TAGS


def _apply(elem: DataElement, vr: str, action: str, ctx: _Context) -> DataElement | None:
    """One element after ``action`` (not X), written with the dictionary's ``vr``; None removes it."""
    tag = elem.tag
    if action == "U*" and vr != "SQ":
        action = "U" if vr == "UI" else "Z"
    if vr == "SQ":
        if elem.VR != "SQ":
            return None  # a sequence tag holding something else: nothing in it can be judged
        if action in ("Z", "D"):
            return DataElement(tag, vr, Sequence())
        return DataElement(tag, vr, Sequence([_clean(item, ctx) for item in elem.value]))
    if action == "Z" or (action == "D" and vr not in _DUMMIES and vr != "UI"):
        return DataElement(tag, vr, None if vr not in _TEXT_VRS | _DATE_TIME_VRS | {"AS", "IS", "DS", "UI"} else "")
    if not elem.value:
        return DataElement(tag, vr, elem.value)
    values = _values(elem)
    if action == "U" or (action == "D" and vr == "UI"):
        # only UIDs that DICOM registers (classes, syntaxes, well-known instances) name nothing patient-specific
        mapped = [v if str(v) in UID_dictionary else remap_uid(str(v), ctx.key, ctx.uid_root) for v in values]
    elif action == "D" and tag == _PATIENT_ID:
        # an absent ID stays absent rather than becoming one pseudonym shared by every unknown patient
        mapped = [pseudonymise_patient_id(str(values[0]), ctx.key)]
    elif action == "D":
        mapped = [_DUMMIES[vr]]
    elif vr in _DATE_TIME_VRS:  # "C": the Modified Dates option
        if ctx.shift is None:
            return None
        mapped = [shift_date(str(v), vr, ctx.shift) for v in values]
        if None in mapped:
            return None  # not a date we can shift: removing it is the safe choice
    elif vr in _TEXT_VRS:  # "C": cleaned text
        mapped = [scrub_text(str(v), ctx.identifiers)[:_MAX_LENGTH.get(vr, 1 << 30)] for v in values]
    else:
        return DataElement(tag, vr, None)  # "C" of a binary value: nothing to keep
    return DataElement(tag, vr, mapped if len(mapped) > 1 else mapped[0])


_PATIENT_ID = Tag("PatientID")


def _safe_private(ds: Dataset, tag: BaseTag, rules: frozenset[tuple[int, str, int]]) -> bool:
    """Whether a private element (or its private creator) is on the safe list."""
    if not rules or tag.element < 0x0010:
        return False
    if tag.element <= 0x00FF:  # a private creator: kept when one of its elements is
        creator = str(ds[tag].value).strip()
        return any(group == tag.group and name == creator for group, name, _ in rules)
    creator_tag = Tag(tag.group, tag.element >> 8)
    if creator_tag not in ds:
        return False
    creator = str(ds[creator_tag].value).strip()
    return (tag.group, creator, tag.element & 0xFF) in rules


__all__ = ["ALLOW_LIST", "ALLOW_LIST_GROUPS", "BASIC", "BURNED_IN_MODALITIES", "CID_7050", "COMBINED",
           "DEVELOPMENT_KEY", "PROFILES", "DeidOptions", "TABLE", "action_for", "allow_list_table",
           "burned_in_annotation_risk", "check_uid_root", "date_shift_days", "deidentify", "dictionary_vr",
           "pseudonymise_patient_id", "remap_uid", "resolve_secret", "scrub_text", "shift_date", "site_label"]


if __name__ == "__main__":  # python -m medtl.ingest.deid: the table of docs/deid_profile.md
    print(allow_list_table(), end="")
