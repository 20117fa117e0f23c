"""De-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

:data:`ACTIONS` maps attribute keywords to the profile's action codes, as data so that it can be
extended towards the full Annex E table:

* ``X`` remove · ``Z`` replace by an empty value · ``D`` replace by a dummy value (for
  ``PatientID``: a keyed pseudonym) · ``U`` replace the UID by a keyed hash · ``K`` keep.

Where Annex E allows several actions (``X/Z``, ``Z/D``, ...) the table picks one that keeps the
object valid (``Z`` for attributes that are type 2 in common IODs, else ``X``). Attributes not in
the table are handled by value representation so that nothing identifying slips through: person
names are emptied, dates and times removed, and every UID other than the well-known DICOM ones
(``1.2.840.10008.*``: SOP classes, transfer syntaxes, coding schemes) remapped. Private tags,
curves and overlays are removed; sequences are processed recursively.

UIDs and patient IDs are replaced by an HMAC-SHA256 of the original under a secret key, so the same
input and key give the same output in every run (studies stay linked across incremental runs) while
nobody without the key can link them back.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import warnings

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian

from medtl.config import DeidConfig

DEVELOPMENT_KEY = b"medtl-development-key-not-for-real-data"
"""Key used when no secret is configured: fine for the synthetic cohort, never for real data."""

WELL_KNOWN_UID_ROOT = "1.2.840.10008."
MAX_UID_LENGTH = 64
METHOD = "DICOM PS3.15 E.1.1 basic profile; UIDs, PatientID by HMAC-SHA256"

ACTIONS: dict[str, str] = {
    # patient
    "PatientName": "Z", "PatientID": "D", "PatientBirthDate": "Z", "PatientBirthTime": "X", "PatientSex": "Z",
    "PatientAge": "X", "PatientAddress": "X", "PatientTelephoneNumbers": "X", "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X", "OtherPatientNames": "X", "PatientBirthName": "X",
    "PatientMotherBirthName": "X", "IssuerOfPatientID": "X", "MedicalRecordLocator": "X", "MilitaryRank": "X",
    "BranchOfService": "X", "EthnicGroup": "X", "Occupation": "X", "PatientComments": "X",
    "AdditionalPatientHistory": "X", "PatientSize": "X", "PatientWeight": "X", "PatientReligiousPreference": "X",
    "PatientState": "X", "PatientSexNeutered": "X", "PatientInsurancePlanCodeSequence": "X",
    "PatientPrimaryLanguageCodeSequence": "X", "PatientTransportArrangements": "X", "CountryOfResidence": "X",
    "RegionOfResidence": "X", "CurrentPatientLocation": "X", "Allergies": "X", "MedicalAlerts": "X",
    "PregnancyStatus": "X", "LastMenstrualDate": "X", "SmokingStatus": "X", "SpecialNeeds": "X",
    "PreMedication": "X", "InsurancePlanIdentification": "X", "ReferencedPatientSequence": "X",
    "ReferencedPatientAliasSequence": "X", "ClinicalTrialSubjectID": "Z",
    # visit / admission
    "AdmissionID": "X", "IssuerOfAdmissionID": "X", "AdmittingDate": "X", "AdmittingTime": "X",
    "AdmittingDiagnosesDescription": "X", "AdmittingDiagnosesCodeSequence": "X",
    "DischargeDiagnosisDescription": "X", "ServiceEpisodeID": "X", "ServiceEpisodeDescription": "X",
    "VisitComments": "X", "ScheduledPatientInstitutionResidence": "X",
    # people
    "ReferringPhysicianName": "Z", "ReferringPhysicianAddress": "X", "ReferringPhysicianTelephoneNumbers": "X",
    "ReferringPhysicianIdentificationSequence": "X", "PerformingPhysicianName": "X",
    "PerformingPhysicianIdentificationSequence": "X", "NameOfPhysiciansReadingStudy": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X", "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X", "OperatorsName": "X", "OperatorIdentificationSequence": "X",
    "RequestingPhysician": "X", "ScheduledPerformingPhysicianName": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X", "ContentCreatorName": "Z", "ReviewerName": "X",
    "PersonName": "Z", "PersonAddress": "X", "PersonTelephoneNumbers": "X", "ResponsiblePerson": "X",
    "ResponsibleOrganization": "X", "VerifyingObserverName": "Z", "VerifyingObserverSequence": "X",
    "VerifyingObserverIdentificationCodeSequence": "X", "VerifyingOrganization": "X",
    "AuthorObserverSequence": "X", "ParticipantSequence": "X", "ActualHumanPerformersSequence": "X",
    "ScheduledHumanPerformersSequence": "X", "OrderEnteredBy": "X", "OrderEntererLocation": "X",
    "OrderCallbackPhoneNumber": "X", "NamesOfIntendedRecipientsOfResults": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X", "DistributionName": "X", "DistributionAddress": "X",
    # institution and device
    "InstitutionName": "X", "InstitutionAddress": "X", "InstitutionalDepartmentName": "X", "StationName": "X",
    "DeviceSerialNumber": "X", "DetectorID": "X", "GantryID": "X", "GeneratorID": "X", "PlateID": "X",
    "CassetteID": "X", "PerformedStationName": "X", "PerformedStationAETitle": "X", "PerformedLocation": "X",
    "PerformedStationGeographicLocationCodeSequence": "X", "ScheduledStationName": "X",
    "ScheduledStationAETitle": "X", "ScheduledStationGeographicLocationCodeSequence": "X",
    "ScheduledStudyLocation": "X", "ScheduledStudyLocationAETitle": "X", "ScheduledProcedureStepLocation": "X",
    "RequestedProcedureLocation": "X", "ModifyingDeviceID": "X", "ModifyingDeviceManufacturer": "X",
    # study, request and procedure
    "AccessionNumber": "Z", "StudyID": "Z", "StudyIDIssuer": "X", "StudyDate": "Z", "StudyTime": "Z",
    "SeriesDate": "X", "SeriesTime": "X", "AcquisitionDate": "X", "AcquisitionTime": "X",
    "AcquisitionDateTime": "X", "ContentDate": "Z", "ContentTime": "Z", "InstanceCreationDate": "X",
    "InstanceCreationTime": "X", "StudyDescription": "X", "SeriesDescription": "X", "StudyComments": "X",
    "ProtocolName": "X", "ProcedureCodeSequence": "X", "RequestAttributesSequence": "X",
    "RequestedProcedureDescription": "X", "RequestedProcedureID": "X", "RequestedProcedureComments": "X",
    "RequestedContrastAgent": "X", "RequestingService": "X", "ReasonForTheRequestedProcedure": "X",
    "ReasonForStudy": "X", "PerformedProcedureStepID": "X", "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepEndDate": "X", "PerformedProcedureStepEndTime": "X",
    "CommentsOnThePerformedProcedureStep": "X", "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepStartDate": "X", "ScheduledProcedureStepStartTime": "X",
    "ScheduledProcedureStepEndDate": "X", "ScheduledProcedureStepEndTime": "X",
    "ReferencedStudySequence": "X", "ReferencedPerformedProcedureStepSequence": "X",
    "AcquisitionComments": "X", "AcquisitionContextSequence": "X", "AcquisitionDeviceProcessingDescription": "X",
    "ContributionDescription": "X", "DerivationDescription": "X", "SourceImageSequence": "X",
    "ImageComments": "X", "FrameComments": "X", "IconImageSequence": "X", "TextComments": "X", "TextString": "X",
    "TopicAuthor": "X", "TopicKeywords": "X", "TopicSubject": "X", "TopicTitle": "X", "ResultsComments": "X",
    "ResultsIDIssuer": "X", "ResultsDistributionListSequence": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    # bookkeeping that can carry the original values
    "OriginalAttributesSequence": "X", "ModifiedAttributesSequence": "X", "DigitalSignaturesSequence": "X",
    "DataSetTrailingPadding": "X",
    # identifiers
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "FrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U", "ReferencedFrameOfReferenceUID": "U", "RelatedFrameOfReferenceUID": "U",
    "SynchronizationFrameOfReferenceUID": "U", "InstanceCreatorUID": "U", "IrradiationEventUID": "U",
    "ConcatenationUID": "U", "DimensionOrganizationUID": "U", "DeviceUID": "U", "StorageMediaFileSetUID": "U",
    "TransactionUID": "U", "UID": "U",
    # identify the de-identification itself
    "PatientIdentityRemoved": "K", "DeidentificationMethod": "K", "DeidentificationMethodCodeSequence": "K",
    "LongitudinalTemporalInformationModified": "K",
}

KEEP_UIDS = frozenset({"SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                       "ImplementationClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID"})

_DATE_TIME_VRS = frozenset({"DA", "DT", "TM"})
_DUMMIES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y", "IS": "0", "DS": "0",
            "PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "CS": "ANONYMIZED", "LT": "ANONYMIZED",
            "ST": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED"}


def resolve_secret(cfg: DeidConfig) -> bytes:
    """The key for UID and patient-ID hashing.

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


def action_for(tag: BaseTag, vr: str) -> str:
    """The Annex E action for one public element: the table first, then rules by tag and VR.

    Args:
        tag: the element's tag.
        vr: its value representation.

    Returns:
        One of ``"X"``, ``"Z"``, ``"D"``, ``"U"``, ``"K"``.
    """
    keyword = keyword_for_tag(tag)
    if keyword in ACTIONS:
        return ACTIONS[keyword]
    if 0x5000 <= tag.group <= 0x50FF or (0x6000 <= tag.group <= 0x60FF and tag.element in (0x3000, 0x4000)):
        return "X"  # curve data, overlay data and overlay comments can carry burned-in identity
    if vr == "UI":
        return "K" if keyword in KEEP_UIDS else "U"
    if vr == "PN":
        return "Z"
    if vr in _DATE_TIME_VRS:
        return "X"
    return "K"


def deidentify(ds: Dataset, key: bytes, uid_root: str = "2.25") -> Dataset:
    """Return a de-identified copy of ``ds``; the input is not modified.

    The copy is built element by element instead of deep-copied (which dominated ingestion time):
    changed elements are new objects, unchanged ones (pixel data included) are shared with ``ds``.
    Replace elements of either dataset rather than mutating them in place.

    Args:
        ds: the original dataset (with or without file meta).
        key: the secret from :func:`resolve_secret`.
        uid_root: root of remapped UIDs.

    Returns:
        The de-identified dataset with fresh file meta, and PatientIdentityRemoved,
        DeidentificationMethod, DeidentificationMethodCodeSequence (113100) and
        LongitudinalTemporalInformationModified set.
    """
    out = _clean(ds, key, uid_root)
    original_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta = FileMetaDataset()
    if "SOPClassUID" in out:
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    if "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = original_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
    out.file_meta = meta
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    out.DeidentificationMethodCodeSequence = Sequence([code])
    out.LongitudinalTemporalInformationModified = "REMOVED"
    return out


def _clean(ds: Dataset, key: bytes, uid_root: str) -> Dataset:
    out = Dataset()
    # kept elements are copied still encoded: with the same encoding the writer emits their bytes
    # as they are, which makes de-identification and re-encoding several times faster
    implicit, little = ds.original_encoding
    if little is not None:
        out.set_original_encoding(implicit, little, ds.original_character_set)
    for tag in ds.keys():
        if tag.is_private:
            continue
        raw = ds.get_item(tag)
        # an element stored as UN (or implicitly) is judged by the VR the dictionary gives its tag
        vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
        action = action_for(tag, vr)
        if action == "X":
            continue
        if action == "K" and vr != "SQ":
            out[tag] = raw
            continue
        elem = ds[tag]
        if action == "Z":
            elem = DataElement(tag, elem.VR, Sequence() if elem.VR == "SQ" else "")
        elif action == "D":
            elem = DataElement(tag, elem.VR, _dummy(elem, key))
        elif action == "U" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            mapped = [v if str(v).startswith(WELL_KNOWN_UID_ROOT) else remap_uid(str(v), key, uid_root)
                      for v in values]
            elem = DataElement(tag, elem.VR, mapped if elem.VM > 1 else mapped[0])
        elif elem.VR == "SQ":
            elem = DataElement(tag, elem.VR, Sequence([_clean(item, key, uid_root) for item in elem.value]))
        out[tag] = elem
    return out


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _dummy(elem: DataElement, key: bytes) -> object:
    if elem.keyword == "PatientID":
        # an absent ID stays absent rather than becoming one pseudonym shared by every unknown patient
        return pseudonymise_patient_id(str(elem.value), key) if elem.value else ""
    if elem.VR == "SQ":
        return Sequence()
    return _DUMMIES.get(elem.VR, "")
