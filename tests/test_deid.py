"""De-identification (DICOM PS3.15 Annex E): the leak test through the real ingestion, the options, dates,
UIDs, private elements, the method codes and the burned-in annotation rule."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.config import DeidConfig, IngestConfig
from medtl.ingest import ingest_folder, load_manifest
from medtl.ingest.deid import (BASIC, COMBINED, DESCRIPTORS, DEVELOPMENT_KEY, DEVICE_IDENTITY, INSTITUTION_IDENTITY,
                               PATIENT_CHARACTERISTICS_CLEAN, PATIENT_CHARACTERISTICS_KEEP, TABLE, DeidOptions,
                               action_for, burned_in_annotation_risk, date_shift_days, deidentify, remap_uid,
                               resolve_secret, shift_date, site_label)
from medtl.workspace import Workspace
from tests.test_ingest import cohort, ingested  # noqa: F401  (fixtures: the tiny synthetic cohort, ingested)

KEY = b"test-key"
UID_ROOT = "1.2.999.424242"  # distinctive: its substring must appear in no output
UID_MARK = "999.424242"
CT = "1.2.840.10008.5.1.4.1.1.2"
ANNEX_E = DeidOptions(profile="annex_e")  # Table E.1-1 as a deny-list: what survives it is tested here
BOOKKEEPING = {"DeidentificationMethod", "DeidentificationMethodCodeSequence",
               "LongitudinalTemporalInformationModified"}
DATES = {  # distinctive dates, one per attribute; none may survive unless shifted
    "PatientBirthDate": "19370415", "StudyDate": "20110203", "SeriesDate": "20110204", "AcquisitionDate": "20110205",
    "ContentDate": "20110206", "InstanceCreationDate": "20110207", "PerformedProcedureStepStartDate": "20110208",
    "LastMenstrualDate": "20101224", "AdmittingDate": "20110131",
}
NESTED_DATE = "20110210"
DATETIME = "20110209093015.123456+0530"


class Markers:
    """Distinct PHI markers (``PHI<patient><serial>``), each remembered with where it was planted."""

    def __init__(self, patient: int) -> None:
        self.patient = patient
        self.where: dict[str, str] = {}
        self.descriptors: set[str] = set()  # markers standing for the non-identifying words of a description

    def __call__(self, where: str, descriptor: bool = False) -> str:
        marker = f"PHI{self.patient}{len(self.where):03d}"  # fixed width: no marker contains another
        self.where[marker] = where
        if descriptor:
            self.descriptors.add(marker)
        return marker


def planted_dataset(m: Markers, patient_id: str | None = None) -> Dataset:
    """An image with PHI in every attribute class of the profile, in sequences three levels deep and in
    private elements; ``m`` records every marker."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.Modality, ds.BurnedInAnnotation = CT, "CT", "NO"
    ds.SOPInstanceUID, ds.StudyInstanceUID = f"{UID_ROOT}.{m.patient}.3", f"{UID_ROOT}.{m.patient}.1"
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = f"{UID_ROOT}.{m.patient}.2", f"{UID_ROOT}.{m.patient}.4"
    ds.IrradiationEventUID = f"{UID_ROOT}.{m.patient}.9"
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scanner 1"
    family, given = m("PatientName family"), m("PatientName given")
    ds.PatientName = f"{family}^{given}"
    ds.PatientID = patient_id or m("PatientID")
    for keyword in ("OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "ReferringPhysicianName",
                    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord",
                    "RequestingPhysician", "ConsultingPhysicianName", "ResponsiblePerson"):  # names
        setattr(ds, keyword, f"{m(keyword)}^{m(keyword + ' given')}")
    for keyword in ("OtherPatientIDs", "AccessionNumber", "StudyID", "IssuerOfPatientID", "MedicalRecordLocator",
                    "AdmissionID", "PerformedProcedureStepID", "RequestedProcedureID", "ClinicalTrialSubjectID",
                    # addresses and telephone numbers
                    "PatientAddress", "PatientTelephoneNumbers", "ReferringPhysicianAddress",
                    "ReferringPhysicianTelephoneNumbers", "CountryOfResidence", "RegionOfResidence",
                    # institution and device
                    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
                    "DeviceSerialNumber", "DetectorID", "PlateID", "GantryID", "GeneratorID", "CassetteID",
                    "PerformedStationName", "PerformedStationAETitle",
                    # free text and patient details
                    "TextString", "TextComments", "EthnicGroup"):
        setattr(ds, keyword, m(keyword))
    identity = f"{family} {given} {ds.PatientID} 1937-04-15 +41 79 555 1234"
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "PatientComments",
                    "AdditionalPatientHistory", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
                    "AcquisitionComments", "DerivationDescription", "ReasonForStudy", "StudyComments",
                    "Occupation", "MedicalAlerts", "Allergies", "PatientState", "PreMedication", "SpecialNeeds"):
        short = pydicom.datadict.dictionary_VR(keyword) == "SH"  # 16 characters: no room for the identity
        setattr(ds, keyword, m(keyword, descriptor=True) + ("" if short else f" {identity}"))
    for keyword, value in DATES.items():
        setattr(ds, keyword, value)
    ds.AcquisitionDateTime = DATETIME
    ds.StudyTime, ds.SeriesTime = "071503", "071604"
    ds.PatientSex, ds.PatientAge, ds.PatientSize, ds.PatientWeight = "F", "073Y", "1.62", "58.5"

    # sequences: removed, emptied, dummied, kept with their UIDs remapped, three levels deep
    level3 = Dataset()
    level3.SeriesInstanceUID, level3.StudyDate = ds.SeriesInstanceUID, NESTED_DATE
    level3.OperatorsName, level3.InstitutionName = m("nested L3 OperatorsName"), m("nested L3 InstitutionName")
    level3.add_new(0x00310010, "LO", f"OTHER {m('nested private creator')}")
    level3.add_new(0x00311001, "LT", m("nested private element"))
    level2 = Dataset()
    level2.ReferencedSOPClassUID, level2.ReferencedSOPInstanceUID = CT, f"{UID_ROOT}.{m.patient}.6"
    level2.ReferencedFrameOfReferenceUID, level2.StudyInstanceUID = ds.FrameOfReferenceUID, ds.StudyInstanceUID
    level2.PatientName = m("nested L2 PatientName")
    level2.ReferencedSeriesSequence = Sequence([level3])
    level1 = Dataset()
    level1.ReferencedSOPClassUID, level1.ReferencedSOPInstanceUID = CT, f"{UID_ROOT}.{m.patient}.5"
    level1.PerformingPhysicianName = m("nested L1 PerformingPhysicianName")
    level1.SourceImageSequence = Sequence([level2])
    ds.ReferencedImageSequence = Sequence([level1])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID, study_ref.ReferencedSOPInstanceUID = CT, ds.StudyInstanceUID
    study_ref.PatientID = m("ReferencedStudySequence PatientID")
    ds.ReferencedStudySequence = Sequence([study_ref])
    request = Dataset()
    request.RequestedProcedureID = m("RequestAttributesSequence RequestedProcedureID")
    request.ScheduledProcedureStepDescription = f"{m('ScheduledProcedureStepDescription', True)} {identity}"
    request.ScheduledProcedureStepID = m("RequestAttributesSequence ScheduledProcedureStepID")
    ds.RequestAttributesSequence = Sequence([request])
    person_code = Dataset()
    person_code.CodeValue, person_code.CodingSchemeDesignator = m("PersonIdentificationCode value"), "L"
    person_code.CodeMeaning = m("PersonIdentificationCode meaning")
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = Sequence([person_code])
    operator.InstitutionName = m("OperatorIdentificationSequence InstitutionName")
    ds.OperatorIdentificationSequence = Sequence([operator])
    other_id = Dataset()
    other_id.PatientID = m("OtherPatientIDsSequence PatientID")
    other_id.IssuerOfPatientID = m("OtherPatientIDsSequence IssuerOfPatientID")
    ds.OtherPatientIDsSequence = Sequence([other_id])

    # private elements: creator, text, bytes and a private sequence
    ds.add_new(0x00290010, "LO", f"ACME {m('private creator')}")
    ds.add_new(0x00291010, "LO", m("private LO"))
    ds.add_new(0x00291011, "OB", m("private OB").encode())
    private_item = Dataset()
    private_item.PatientName = m("private sequence PatientName")
    ds.add_new(0x00291012, "SQ", Sequence([private_item]))

    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = (np.add.outer(np.arange(16), np.arange(16)) * 100).astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, ds.SOPInstanceUID
    return ds


@contextmanager
def medtl_log(path: Path) -> Iterator[None]:
    """Everything the ``medtl`` loggers emit, written to ``path``."""
    logger = logging.getLogger("medtl")
    handler, level = logging.FileHandler(path), logger.level
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def needles(m: Markers, allowed: set[str]) -> dict[bytes, str]:
    """Byte strings that must not appear in any output → what they are."""
    found = {marker.encode(): where for marker, where in m.where.items() if marker not in allowed}
    found[UID_MARK.encode()] = "UID root"
    for keyword, date in [*DATES.items(), ("nested StudyDate", NESTED_DATE), ("AcquisitionDateTime", DATETIME[:8])]:
        found[date.encode()] = keyword
        found[f"{date[:4]}-{date[4:6]}-{date[6:]}".encode()] = keyword
    return found


@pytest.mark.parametrize("options", [
    {},
    {"longitudinal_temporal": "shift", "clean_descriptors": True},
    {"profile": "annex_e"},
    {"profile": "annex_e", "longitudinal_temporal": "shift", "clean_descriptors": True},
], ids=["basic", "modified-dates+clean-descriptors", "annex-e", "annex-e+modified-dates+clean-descriptors"])
def test_no_planted_phi_reaches_any_output(tmp_path: Path, options: dict) -> None:
    m = Markers(1)
    ds = planted_dataset(m)
    source = tmp_path / "input" / "site_x"
    source.mkdir(parents=True)
    ds.save_as(source / "image.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "out")
    ws.root.mkdir()
    deid = DeidConfig(site_aliases={str(ds.InstitutionName): "site_a"}, **options)
    with medtl_log(ws.root / "ingest.log"):
        summary = ingest_folder(IngestConfig(input_dir=tmp_path / "input", image_size=16, deid=deid), ws)

    # quarantine/ holds original files by design (PHI-bearing): this file must not end up there
    assert (summary.ingested, summary.quarantined) == (1, 0), summary
    assert not any(ws.quarantine.iterdir())
    assert load_manifest(ws)["hospital"].tolist() == ["site_a"]
    written = pydicom.dcmread(next((ws.ingest / "dicom").glob("*.dcm")))
    assert {c.CodeValue for c in written.DeidentificationMethodCodeSequence} == \
        {v for v, _ in DeidOptions.from_config(deid).method_codes()}
    assert (ws.root / "ingest.log").stat().st_size > 0

    allowed = m.descriptors if deid.clean_descriptors else set()
    forbidden = needles(m, allowed)
    scanned, leaks = 0, []
    for path in sorted(p for p in ws.root.rglob("*") if p.is_file() and ws.quarantine not in p.parents):
        data = path.read_bytes()
        scanned += 1
        leaks += [f"{path.relative_to(ws.root)}: {needle.decode()} ({what})"
                  for needle, what in forbidden.items() if needle in data]
    assert scanned >= 5  # DICOM, array, manifest, ledger, log
    assert not leaks, "\n".join(leaks)
    if deid.clean_descriptors:  # the cleaned descriptions are there, only scrubbed
        assert str(written.StudyDescription).startswith(next(k for k, v in m.where.items() if v == "StudyDescription"))


def test_synthetic_cohort_phi_does_not_survive(ingested, cohort: Path) -> None:  # noqa: F811
    ws, _ = ingested
    planted: set[str] = set()
    for path in cohort.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        # every value the profile removes or replaces, descriptions included (the allow-list drops them too)
        planted |= {str(e.value) for e in ds if e.VR in ("PN", "LO", "SH", "ST", "DA", "UI") and e.value
                    and action_for(e.tag) != "K"}
    planted.discard("")
    written = list((ws.ingest / "dicom").glob("*.dcm"))
    assert len(written) == 24
    for path in written:
        data = path.read_bytes()
        assert not [phi for phi in planted if phi.encode() in data], path
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
        assert not any(elem.tag.is_private for elem in ds)
        assert {e.value for e in ds if e.VR in ("DA", "DT")} <= {"", "19000101", "19000101000000"}
        assert ds.SOPInstanceUID.startswith("2.25.") and path.stem == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    tables = ws.manifest.read_bytes() + (ws.ingest / "ledger.parquet").read_bytes()
    institutions = {"St. Aurelia General Hospital", "Northbridge University Clinic"}  # their own site aliases
    assert not [phi for phi in planted - institutions if phi.encode() in tables]


# ---------------------------------------------------------------------------------------------- the table


def test_annex_e_table_covers_the_profile_and_resolves_combined_actions() -> None:
    assert len(TABLE) > 600 and set(TABLE.values()) == {"D", "Z", "X", "U", *COMBINED}
    expected = {"PatientName": "Z", "PatientID": "D", "AccessionNumber": "Z", "StudyDate": "Z", "PatientAddress": "X",
                "InstitutionName": "D", "AcquisitionDate": "Z", "SeriesDate": "D", "StudyInstanceUID": "U",
                "ReferencedImageSequence": "U*", "ReferencedStudySequence": "Z", "PatientAge": "X"}
    for keyword, action in expected.items():
        tag = pydicom.tag.Tag(keyword)
        assert action_for(tag, ANNEX_E) == action, keyword
    # outside the table: overlays and curves removed, class UIDs kept, other UIDs remapped, names emptied
    assert action_for(pydicom.tag.Tag(0x60023000), ANNEX_E) == "X" == action_for(pydicom.tag.Tag(0x50000010), ANNEX_E)
    assert action_for(pydicom.tag.Tag("ContentCreatorName"), ANNEX_E) == "D"
    assert action_for(pydicom.tag.Tag("ReferencedSOPClassUID"), ANNEX_E) == "K"
    assert action_for(pydicom.tag.Tag("RTVCommunicationSOPInstanceUID"), ANNEX_E) == "U"
    assert action_for(pydicom.tag.Tag("EvaluatorName"), ANNEX_E) == "Z"
    assert action_for(pydicom.tag.Tag("ExpiryDate"), ANNEX_E) == "X"
    assert action_for(pydicom.tag.Tag(0x00189999), ANNEX_E) == "X"  # a tag the dictionary does not know
    assert action_for(pydicom.tag.Tag(0x00080000), ANNEX_E) == "X"  # group length


def test_deidentify_recurses_into_sequences_and_leaves_the_input_alone() -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.StudyDate = "Doe^Jane", "MRN123", "20200101"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.5"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.6"
    item.PerformingPhysicianName = "House^Greg"
    item.add_new(0x00091001, "LO", "Doe private")
    ds.ReferencedImageSequence = Sequence([item])
    out = deidentify(ds, b"key", options=ANNEX_E)
    assert (out.PatientName, out.StudyDate) == ("", "")
    assert out.PatientID.startswith("P") and len(out.PatientID) == 13
    assert out.SOPClassUID == ds.SOPClassUID and out.SOPInstanceUID == remap_uid("1.2.3.4.5", b"key")
    ref = out.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == remap_uid("1.2.3.4.6", b"key")
    assert ref.ReferencedSOPClassUID == item.ReferencedSOPClassUID
    assert "PerformingPhysicianName" not in ref and 0x00091001 not in ref
    assert ds.PatientName == "Doe^Jane" and 0x00091001 in item  # the input is unchanged


# ---------------------------------------------------------------------------------------------- UIDs


def test_uids_are_stable_and_references_stay_consistent_at_every_depth() -> None:
    ds = planted_dataset(Markers(1))
    first, second = deidentify(ds, KEY, options=ANNEX_E), deidentify(planted_dataset(Markers(1)), KEY, options=ANNEX_E)
    assert first.SOPInstanceUID == second.SOPInstanceUID == remap_uid(ds.SOPInstanceUID, KEY)
    level1 = first.ReferencedImageSequence[0]
    level2 = level1.SourceImageSequence[0]
    level3 = level2.ReferencedSeriesSequence[0]
    assert level1.ReferencedSOPInstanceUID == remap_uid(f"{UID_ROOT}.1.5", KEY)
    assert level2.ReferencedSOPInstanceUID == remap_uid(f"{UID_ROOT}.1.6", KEY)
    assert level2.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
    assert level2.StudyInstanceUID == first.StudyInstanceUID and level3.SeriesInstanceUID == first.SeriesInstanceUID
    assert level1.ReferencedSOPClassUID == level2.ReferencedSOPClassUID == CT  # well-known UIDs are kept
    assert (level3.OperatorsName, level3.InstitutionName) == ("ANONYMOUS", "ANONYMIZED")  # X/Z/D -> D
    assert 0x00310010 not in level3 and 0x00311001 not in level3
    assert len(first.ReferencedStudySequence) == 0  # X/Z -> emptied
    assert len(first.OperatorIdentificationSequence) == 0  # X/D -> D: an empty sequence, no dummy item
    assert remap_uid(ds.SOPInstanceUID, b"another key") != first.SOPInstanceUID
    assert len(remap_uid(ds.SOPInstanceUID, KEY, "1.2.826.0.1.3680043.10.9")) <= 64  # longest root allowed


# ---------------------------------------------------------------------------------------------- options


def _differing(a: Dataset, b: Dataset) -> set[str]:
    """Keywords of top-level elements that differ between two outputs, bookkeeping aside."""
    tags = set(a.keys()) | set(b.keys())
    return {pydicom.datadict.keyword_for_tag(t) or str(t) for t in tags
            if (a.get(t) is None) != (b.get(t) is None) or (t in a and t in b and a[t].value != b[t].value)
            } - BOOKKEEPING


def _present(ds: Dataset, tags: frozenset[int]) -> set[str]:
    return {pydicom.datadict.keyword_for_tag(t) for t in tags if t in ds}


def _holding(ds: Dataset, wanted, options: DeidOptions) -> set[str]:
    """Top-level elements that are ``wanted`` or sequences kept by ``options`` with one inside, at any depth."""
    def inside(item: Dataset) -> bool:
        return any(wanted(e) or (e.VR == "SQ" and any(inside(i) for i in e.value)) for e in item)
    return {e.keyword for e in ds if not e.tag.is_private and (wanted(e) or (
        e.VR == "SQ" and action_for(e.tag, options) in ("K", "U*", "C") and any(inside(i) for i in e.value)))}


@pytest.mark.parametrize("profile", ["allow_list", "annex_e"])
@pytest.mark.parametrize(("option", "keep", "clean"), [
    ("retain_device_identity", DEVICE_IDENTITY, frozenset()),
    ("retain_institution_identity", INSTITUTION_IDENTITY, frozenset()),
    ("retain_patient_characteristics", PATIENT_CHARACTERISTICS_KEEP, PATIENT_CHARACTERISTICS_CLEAN),
    ("clean_descriptors", frozenset(), DESCRIPTORS),
])
def test_each_option_changes_exactly_its_column(option: str, keep: frozenset[int], clean: frozenset[int],
                                                profile: str) -> None:
    m = Markers(1)
    ds = planted_dataset(m)
    ds.SmokingStatus, ds.PregnancyStatus = "NO", 4
    options = DeidOptions(profile=profile, **{option: True})
    basic, out = deidentify(ds, KEY, options=DeidOptions(profile=profile)), deidentify(ds, KEY, options=options)
    assert _present(ds, keep | clean), option
    assert _differing(basic, out) == _holding(ds, lambda e: e.tag in keep | clean, options)
    for keyword in _present(ds, keep):
        assert out[keyword].value == ds[keyword].value, keyword
    identity = {marker for marker in m.where if marker not in m.descriptors}
    for keyword in _present(ds, clean):
        elem = out[keyword]
        text = str(elem.value) if elem.VR != "SQ" else str(elem.value[0])
        assert not [marker for marker in identity if marker in text], text
        assert "1937" not in text and "555" not in text, text
    if option == "clean_descriptors":
        assert str(out.StudyDescription).startswith(str(ds.StudyDescription)[:7]) and "***" in out.StudyDescription
        nested = out.RequestAttributesSequence[0]
        assert "RequestedProcedureID" not in nested and "***" in nested.ScheduledProcedureStepDescription


def test_modified_dates_shift_every_date_of_a_patient_by_one_stable_offset() -> None:
    ds = planted_dataset(Markers(1), patient_id="MRN-0001")
    options = DeidOptions(profile="annex_e", longitudinal_temporal="shift")  # the nested references survive it
    out = deidentify(ds, KEY, options=options)
    temporal = {e.keyword for e in ds if e.VR in ("DA", "DT", "TM")} - {"PatientBirthDate"}
    assert _differing(deidentify(ds, KEY, options=ANNEX_E), out) == _holding(
        ds, lambda e: e.VR in ("DA", "DT", "TM") and e.keyword != "PatientBirthDate", options)
    shift = date_shift_days("MRN-0001", KEY, options.date_shift_max_days)
    assert -3650 <= shift <= -1
    days = {k: (np.datetime64(_iso(out[k].value[:8])) - np.datetime64(_iso(ds[k].value[:8]))).astype(int)
            for k in temporal if ds[k].VR != "TM"}
    assert set(days.values()) == {shift}, days  # intervals between any two dates are kept
    assert out.AcquisitionDateTime[8:] == DATETIME[8:]  # time of day, fraction and UTC offset kept
    assert (out.StudyTime, out.PatientBirthDate) == (ds.StudyTime, "")
    nested = out.ReferencedImageSequence[0].SourceImageSequence[0].ReferencedSeriesSequence[0]
    assert (np.datetime64(_iso(nested.StudyDate)) - np.datetime64(_iso(NESTED_DATE))).astype(int) == shift
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    # another run, another batch, another image of the same patient: the same shift
    later = planted_dataset(Markers(2), patient_id="MRN-0001")
    later.StudyDate = "20150601"
    assert deidentify(later, KEY, options=options).StudyDate == shift_date("20150601", "DA", shift)
    other = date_shift_days("MRN-0002", KEY, 3650)
    assert other != shift and date_shift_days("MRN-0001", b"other key", 3650) != shift


def _iso(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}"


@pytest.mark.parametrize(("value", "vr", "expected"), [
    ("20200301", "DA", "20200229"),
    ("2020.03.01", "DA", "20200229"),
    ("20200301120000.5-0500", "DT", "20200229120000.5-0500"),
    ("202003", "DT", "202003"),      # month precision kept (shifted from the 15th)
    ("202003", "DT", "202002"),
    ("2020", "DT", "2020"),
    ("101500", "TM", "101500"),
    ("not a date", "DA", None),
    ("20201341", "DA", None),
])
def test_shift_date_keeps_precision_and_offsets(value: str, vr: str, expected: str | None) -> None:
    days = -20 if expected == "202002" else -1
    assert shift_date(value, vr, days) == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_full_dates_keep_dates_and_unparseable_dates_are_removed_when_shifting() -> None:
    ds = planted_dataset(Markers(1))
    kept = deidentify(ds, KEY, options=DeidOptions(longitudinal_temporal="keep"))
    assert (kept.StudyDate, kept.AcquisitionDateTime, kept.PatientBirthDate) == (DATES["StudyDate"], DATETIME, "")
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"
    ds.SeriesDate = "garbage"
    shift = DeidOptions(longitudinal_temporal="shift")
    assert "SeriesDate" not in deidentify(ds, KEY, options=shift)
    # without a PatientID the study keys the shift; without either the dates are removed, and the
    # record says so
    del ds.PatientID
    by_study = deidentify(ds, KEY, options=shift)
    assert by_study.StudyDate == shift_date(DATES["StudyDate"], "DA", date_shift_days(ds.StudyInstanceUID, KEY, 3650))
    del ds.StudyInstanceUID
    removed = deidentify(ds, KEY, options=shift)
    assert "AcquisitionDate" not in removed and removed.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in removed.DeidentificationMethodCodeSequence] == ["113100"]


# ---------------------------------------------------------------------------------------------- codes, private


@pytest.mark.parametrize(("config", "codes"), [
    ({}, ["113100"]),
    ({"longitudinal_temporal": "shift"}, ["113100", "113107"]),
    ({"longitudinal_temporal": "keep", "retain_device_identity": True}, ["113100", "113106", "113109"]),
    ({"retain_patient_characteristics": True, "retain_institution_identity": True, "clean_descriptors": True,
      "private_safe_list": ["0029,ACME SAFE,10"]}, ["113100", "113105", "113108", "113111", "113112"]),
])
def test_method_code_sequence_lists_the_profile_and_each_option(config: dict, codes: list[str]) -> None:
    out = deidentify(planted_dataset(Markers(1)), KEY, options=DeidOptions.from_config(DeidConfig(**config)))
    sequence = out.DeidentificationMethodCodeSequence
    assert [c.CodeValue for c in sequence] == codes
    assert {c.CodingSchemeDesignator for c in sequence} == {"DCM"}
    assert sequence[0].CodeMeaning == "Basic Application Confidentiality Profile"
    assert out.PatientIdentityRemoved == "YES" and all(len(v) <= 64 for v in out.DeidentificationMethod)


def test_private_safe_list_keeps_only_the_listed_elements() -> None:
    ds = planted_dataset(Markers(1))
    ds[0x00290010].value = "ACME SAFE"
    options = DeidOptions.from_config(DeidConfig(profile="annex_e", private_safe_list=["0029, ACME SAFE ,10"]))
    out = deidentify(ds, KEY, options=options)
    assert out[0x00290010].value == "ACME SAFE" and out[0x00291010].value == ds[0x00291010].value
    assert 0x00291011 not in out and 0x00291012 not in out
    nested = out.ReferencedImageSequence[0].SourceImageSequence[0].ReferencedSeriesSequence[0]
    assert not any(e.tag.is_private for e in nested)
    ds[0x00290010].value = "SOMEONE ELSE"  # same element number, another creator: not safe
    assert not any(e.tag.is_private for e in deidentify(ds, KEY, options=options))
    assert not any(e.tag.is_private for e in deidentify(ds, KEY))


@pytest.mark.parametrize("rule", ["0029,ACME", "0028,ACME,10", "zz,ACME,10", "0029,,10", "0029,ACME,100"])
def test_malformed_private_safe_list_entries_are_refused(rule: str) -> None:
    with pytest.raises(ValueError, match="'GGGG,private creator,EE'"):
        DeidConfig(private_safe_list=[rule])


# ---------------------------------------------------------------------------------------------- burned-in, site


def _image(**attrs) -> Dataset:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"Modality": "CT", "BurnedInAnnotation": "YES"}, "BurnedInAnnotation (0028,0301) is YES"),
    ({"Modality": "US"}, "BurnedInAnnotation (0028,0301) is missing and Modality US"),
    ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "missing and Modality OT"),
    ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "missing and a Secondary Capture SOP class"),
    ({"Modality": "XC", "BurnedInAnnotation": "NO", "RecognizableVisualFeatures": "YES"},
     "RecognizableVisualFeatures (0028,0302) is YES"),
    ({"Modality": "US", "BurnedInAnnotation": "NO"}, None),
    ({"Modality": "CT"}, None),
    ({"Modality": "DX", "BurnedInAnnotation": "no"}, None),
])
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_burned_in_annotation_risk(attrs: dict, reason: str | None) -> None:
    found = burned_in_annotation_risk(_image(**attrs), pixels_cleaned=False)
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found and "pixels_cleaned_upstream" in found
    assert burned_in_annotation_risk(_image(**attrs), pixels_cleaned=True) is None


def test_site_label_uses_aliases_and_pseudonyms() -> None:
    aliases = {"St. Elsewhere": "site_a"}
    assert site_label("St. Elsewhere", aliases, KEY) == "site_a"
    unknown = site_label("Another Clinic", aliases, KEY)
    assert re.fullmatch(r"site-[0-9a-f]{10}", unknown) and unknown == site_label("Another Clinic", aliases, KEY)
    assert site_label("", aliases, KEY) == "" == site_label(" ", {}, KEY)


def test_secret_comes_from_config_then_environment_then_development_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_UID_SECRET", "from-env")
    assert resolve_secret(DeidConfig(uid_secret="from-config")) == b"from-config"
    assert resolve_secret(DeidConfig()) == b"from-env"
    monkeypatch.delenv("MEDTL_UID_SECRET")
    with pytest.warns(UserWarning, match="set \\$MEDTL_UID_SECRET"):
        assert resolve_secret(DeidConfig()) == DEVELOPMENT_KEY


def test_options_validate() -> None:
    assert DeidOptions.from_config(DeidConfig()) == BASIC
    with pytest.raises(ValueError, match="longitudinal_temporal"):
        DeidOptions(longitudinal_temporal="blur")
    with pytest.raises(ValueError, match="profile"):
        DeidOptions(profile="deny_list")
    with pytest.raises(ValueError):
        DeidConfig(longitudinal_temporal="blur")
