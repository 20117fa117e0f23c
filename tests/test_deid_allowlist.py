"""De-identification by allow-list (issue 21), one test per class of what survived the deny-list: attributes
missing from Table E.1-1 (judged by the dictionary, not the file's VR), Clean Descriptors' free-text names and
dates, safe-listed private sequences, instance UIDs under the DICOM root, and the manifest's hospital name; then
the leak scan through the real ingestion with a marker of every class, and what ingestion reads surviving."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.config import DeidConfig, IngestConfig, load_config
from medtl.ingest import ingest_folder, load_manifest
from medtl.ingest.deid import (ALLOW_LIST, ALLOW_LIST_GROUPS, DeidOptions, action_for, allow_list_table,
                               deidentify, remap_uid, site_label)
from medtl.ingest.volume import HEADER_TAGS, read_slice_headers
from medtl.ingest.worker import acquisition_fields
from medtl.workspace import Workspace
from tests.test_deid import KEY, UID_ROOT, Markers, medtl_log, needles, planted_dataset

ROOT = Path(__file__).resolve().parents[1]
MR = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
ANNEX_E = DeidOptions(profile="annex_e")
UNKNOWN_TAGS = {0x00189990: "LO", 0x00189991: "UN", 0x00189992: "UT"}  # public, not in the dictionary
SAFE_RULE = "0029,ACME SAFE,12"  # the private sequence (0029,1012) of planted_dataset
ROOT_UID = f"1.2.840.10008.{UID_ROOT[4:]}"  # an instance UID under the DICOM root: "999.424242" is a marker


def _written(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _code(m: Markers, where: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = m(f"{where} CodeValue")[:16], "L", m(where)
    return item


def plant_outside_the_table(ds: Dataset, m: Markers) -> set[str]:
    """Plant PHI where the deny-list kept it; return the markers that only the allow-list removes (the deny-list
    keeps them by design; unknown tags and wrongly written names and dates go in either profile)."""
    before = set(m.where)
    for keyword in ("ProcedureCodeSequence", "RequestedProcedureCodeSequence", "PerformedProtocolCodeSequence",
                    "SeriesDescriptionCodeSequence"):
        setattr(ds, keyword, Sequence([_code(m, f"{keyword} CodeMeaning")]))
    ds.TextValue = m("TextValue outside a ContentSequence")
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = m("IssuerOfAccessionNumberSequence LocalNamespaceEntityID")
    ds.IssuerOfAccessionNumberSequence = Sequence([issuer])
    ds.CommentsOnTheScheduledProcedureStep = m("CommentsOnTheScheduledProcedureStep")
    ds.DocumentTitle = m("DocumentTitle")
    ds.RetrieveURL = f"https://pacs.example.org/{m('RetrieveURL')}"
    encrypted = Dataset()
    encrypted.EncryptedContentTransferSyntaxUID = "1.2.840.10008.1.2.1"
    encrypted.EncryptedContent = m("EncryptedContent plaintext").encode()
    ds.EncryptedAttributesSequence = Sequence([encrypted])
    for group in (0x6000, 0x601E):  # overlays, any 60xx group
        ds.add_new((group << 16) | 0x0022, "LO", m(f"OverlayDescription {group:04X}"))
        ds.add_new((group << 16) | 0x1500, "LO", m(f"OverlayLabel {group:04X}"))
    ds.SoftwareVersions = m("SoftwareVersions")
    deny_list_keeps = set(m.where) - before
    # in either profile: public tags the dictionary does not know, at the top and inside a kept sequence ...
    frame = Dataset()
    for tag, vr in UNKNOWN_TAGS.items():
        value = m(f"unknown {vr} tag")
        ds.add_new(tag, vr, value.encode() if vr == "UN" else value)
        frame.add_new(tag, vr, (value + " nested").encode() if vr == "UN" else value + " nested")
        m.where[value + " nested"] = f"unknown {vr} tag in a functional group"
    ds.SharedFunctionalGroupsSequence = Sequence([frame])
    # ... and a person name and a date written with VR LO, outside the table (the VR safety net trusted the file)
    ds.add_new("EvaluatorName", "LO", m("EvaluatorName written as LO"))
    ds.add_new("ExpiryDate", "LO", "20150505")
    m.where["20150505"] = "ExpiryDate written as LO"
    return deny_list_keeps


def _leaked(data: bytes, markers) -> list[str]:
    return [marker for marker in markers if marker.encode() in data]


# ---------------------------------------------------------------------------------------------- 1. allow-list


def test_allow_list_removes_what_the_deny_list_kept_and_judges_by_the_dictionary() -> None:
    m = Markers(1)
    ds = planted_dataset(m)
    deny_list_keeps = plant_outside_the_table(ds, m)
    out = deidentify(ds, KEY)
    assert not _leaked(_written(out), m.where), "the default profile keeps only the allow-list"
    # the rest is there only emptied, as the table empties it (type 2 attributes stay present)
    assert all(e.value in ("", None) or (e.VR == "SQ" and not e.value) for e in out if e.tag not in ALLOW_LIST)
    assert not [t for t in UNKNOWN_TAGS if t in out or t in out.SharedFunctionalGroupsSequence[0]]
    # the deny-list keeps attributes missing from the table, but no longer an unknown tag or a mis-written name
    annex_e = _written(deidentify(ds, KEY, options=ANNEX_E))
    assert set(_leaked(annex_e, m.where)) == deny_list_keeps
    assert action_for(pydicom.tag.Tag("EvaluatorName"), ANNEX_E) == "Z"
    assert action_for(pydicom.tag.Tag(0x00189990)) == "X" == action_for(pydicom.tag.Tag(0x00189990), ANNEX_E)


def test_allow_list_is_declared_once_with_a_reason_and_documented() -> None:
    keywords = [k for group in ALLOW_LIST_GROUPS.values() for k in group]
    assert len(keywords) == len(set(keywords)) == len(ALLOW_LIST)  # each attribute once, each a real keyword
    assert all(reason and group for reason, group in ALLOW_LIST_GROUPS.items())
    doc = (ROOT / "docs" / "deid_profile.md").read_text()
    assert allow_list_table() in doc, "regenerate the table: .venv/bin/python -m medtl.ingest.deid"


# ---------------------------------------------------------------------------------------------- 2. descriptors


def test_clean_descriptors_scrubs_names_with_other_separators_and_dates_with_month_names() -> None:
    ds = planted_dataset(Markers(1))
    ds.PatientName = "Doe^Jane"
    ds.ImageComments = "Doe_Jane_protocol, JANE-DOE, DoeJane; seen April 17, 2023, 17-Apr-2023, born 4 July 1960"
    ds.StudyDescription = "Chest PA 2 views Sept. 3rd, 2019"
    out = deidentify(ds, KEY, options=DeidOptions(profile="annex_e", clean_descriptors=True))
    comments = str(out.ImageComments)
    assert not re.search(r"doe|jane|april|apr|july|2023|1960", comments, re.IGNORECASE), comments
    assert "protocol" in comments and "seen" in comments and "born" in comments
    assert str(out.StudyDescription) == "Chest PA 2 views ***"


# ---------------------------------------------------------------------------------------------- 3. private SQ


@pytest.mark.parametrize("written_as", ["SQ", "UN undefined length"])
def test_a_safe_listed_private_sequence_is_de_identified_recursively(written_as: str) -> None:
    m = Markers(1)
    ds = planted_dataset(m)
    ds[0x00290010].value = "ACME SAFE"
    item = ds[0x00291012].value[0]
    item.PatientAddress, item.StudyDate = m("private sequence PatientAddress"), "20120713"
    item.Rows = 16  # allow-listed: still there after cleaning
    ds[0x00291012].is_undefined_length = True
    data = _written(ds)
    if written_as != "SQ":
        at = data.index(b"\x29\x00\x12\x10SQ")
        data = data[:at + 4] + b"UN" + data[at + 6:]
    read = pydicom.dcmread(io.BytesIO(data))
    for options in (DeidOptions.from_config(DeidConfig(private_safe_list=[SAFE_RULE])),
                    DeidOptions.from_config(DeidConfig(profile="annex_e", private_safe_list=[SAFE_RULE]))):
        out = deidentify(read, KEY, options=options)
        cleaned = out[0x00291012].value[0]
        assert cleaned.Rows == 16 and str(cleaned.get("PatientName", "")) == ""
        written = _written(out)
        assert not _leaked(written, [*m.where, "20120713"]) or options.profile == "annex_e"
        assert not _leaked(written, [k for k, v in m.where.items() if v.startswith("private sequence")] + ["20120713"])


def test_a_safe_listed_private_element_holding_encoded_items_is_removed() -> None:
    ds = planted_dataset(Markers(1))
    ds[0x00290010].value = "ACME SAFE"
    data = _written(ds)  # (0029,1012) SQ with a defined length, rewritten as UN: its value is the encoded items
    at = data.index(b"\x29\x00\x12\x10SQ")
    data = data[:at + 4] + b"UN" + data[at + 6:]
    read = pydicom.dcmread(io.BytesIO(data))
    out = deidentify(read, KEY, options=DeidOptions.from_config(DeidConfig(private_safe_list=[SAFE_RULE])))
    assert 0x00291012 not in out and out[0x00290010].value == "ACME SAFE"


# ---------------------------------------------------------------------------------------------- 4. UIDs


@pytest.mark.parametrize("options", [DeidOptions(), ANNEX_E], ids=["allow_list", "annex_e"])
def test_instance_uids_under_the_dicom_root_are_remapped_and_registered_uids_kept(options: DeidOptions) -> None:
    ds = planted_dataset(Markers(1))
    for n, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")):
        setattr(ds, keyword, f"{ROOT_UID}.{n}")
    out = deidentify(ds, KEY, options=options)
    for n, keyword in enumerate(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")):
        assert out[keyword].value == remap_uid(f"{ROOT_UID}.{n}", KEY), keyword
    assert out.SOPClassUID == ds.SOPClassUID and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# ---------------------------------------------------------------------------------------------- 5. hospital


def test_the_hospital_is_a_keyed_pseudonym_unless_aliased() -> None:
    label = site_label("St. Elsewhere", {}, KEY)
    assert re.fullmatch(r"site-[0-9a-f]{10}", label) and label != site_label("St. Elsewhere", {}, b"other key")
    assert site_label("St. Elsewhere", {"St. Elsewhere": "site_a"}, KEY) == "site_a"


@pytest.mark.parametrize("config", [None, *sorted((ROOT / "configs").glob("*.yaml"))],
                         ids=lambda p: "defaults" if p is None else p.name)
def test_every_shipped_config_names_its_synthetic_hospitals_as_the_manifest_will(config: Path | None) -> None:
    cfg = load_config(config)
    aliases = cfg.ingest.deid.site_aliases
    assert {h.institution for h in cfg.synth.hospitals} <= set(aliases)
    assert set(cfg.data.source_hospitals) | {cfg.data.target_hospital} <= set(aliases.values())
    own_folder = load_config(config, {"ingest": {"input_dir": "/data/site_a"}})
    assert own_folder.ingest.deid.site_aliases == {}  # real data: only the aliases the site configures


# ---------------------------------------------------------------------------------------------- leak scan


@pytest.mark.parametrize("options", [
    {},
    {"private_safe_list": [SAFE_RULE], "longitudinal_temporal": "shift", "clean_descriptors": True},
    {"profile": "annex_e", "clean_descriptors": True, "longitudinal_temporal": "shift",
     "private_safe_list": [SAFE_RULE]},
], ids=["default", "allow-list+clean-descriptors", "annex-e+clean-descriptors"])
def test_no_marker_of_any_class_reaches_any_output(tmp_path: Path, options: dict) -> None:
    m = Markers(2)
    ds = planted_dataset(m)
    deny_list_keeps = plant_outside_the_table(ds, m)  # class 1
    family, given = str(ds.PatientName).split("^")
    month_dates = ["April 17, 2023", "17-Apr-2023", "4 July 1960"]
    ds.ImageComments = f"{m('ImageComments', descriptor=True)} {family}_{given}_protocol {', '.join(month_dates)}"
    ds[0x00290010].value = "ACME SAFE"  # class 3: the private sequence's PatientName, and more, nested
    item = ds[0x00291012].value[0]
    item.PatientAddress, item.OperatorsName = m("private sequence PatientAddress"), m("private sequence Operator")
    ds.SeriesInstanceUID = f"{ROOT_UID}.2"  # class 4; class 5: InstitutionName has no alias
    source = tmp_path / "input" / "site_x"
    source.mkdir(parents=True)
    ds.save_as(source / "image.dcm", enforce_file_format=True)
    ws = Workspace(tmp_path / "out")
    ws.root.mkdir()
    deid = DeidConfig(uid_secret=KEY.decode(), **options)
    with medtl_log(ws.root / "ingest.log"):
        summary = ingest_folder(IngestConfig(input_dir=tmp_path / "input", image_size=16, deid=deid), ws)

    assert (summary.ingested, summary.quarantined) == (1, 0), summary
    manifest = load_manifest(ws)
    assert re.fullmatch(r"site-[0-9a-f]{10}", manifest["hospital"].iloc[0])
    assert manifest["series_uid"].iloc[0] == remap_uid(ds.SeriesInstanceUID, KEY)
    # what an option keeps by design: the descriptions' own words; the deny-list's attributes missing from the table
    allowed = (m.descriptors if deid.clean_descriptors else set()) | (
        deny_list_keeps if deid.profile == "annex_e" else set())
    forbidden = needles(m, allowed) | {d.encode(): "month-name date" for d in month_dates}
    forbidden[b"20150505"] = "ExpiryDate written as LO"
    leaks = []
    for path in sorted(p for p in ws.root.rglob("*") if p.is_file() and ws.quarantine not in p.parents):
        data = path.read_bytes()
        leaks += [f"{path.relative_to(ws.root)}: {needle.decode()} ({what})"
                  for needle, what in forbidden.items() if needle in data]
    assert not leaks, "\n".join(leaks)


# ---------------------------------------------------------------------------------------------- what survives


def enhanced_mr() -> Dataset:
    """A two-frame enhanced MR with per-frame geometry, echo, diffusion and rescale, and the acquisition fields."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MR, f"{UID_ROOT}.3", "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (f"{UID_ROOT}.1", f"{UID_ROOT}.2",
                                                                        f"{UID_ROOT}.4")
    ds.Manufacturer, ds.ManufacturerModelName, ds.BodyPartExamined, ds.ViewPosition = "ACME", "X1", "HEAD", ""
    ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber, ds.ImageType = 7, 1, 1, ["ORIGINAL", "PRIMARY"]
    ds.RepetitionTime, ds.EchoTime, ds.InPlanePhaseEncodingDirection = 2000, 30, "ROW"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames = 16, 12, 11, 2
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(2):
        frame, position, content, echo, diffusion, transform = (Dataset() for _ in range(6))
        position.ImagePositionPatient = [0, 0, 2 * k]
        content.TemporalPositionIndex, content.StackID, content.InStackPositionNumber = 1, "1", k + 1
        echo.EffectiveEchoTime, diffusion.DiffusionBValue = 30, 1000 * k
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2, -10, "US"
        frame.PlanePositionSequence, frame.FrameContentSequence = Sequence([position]), Sequence([content])
        frame.MREchoSequence, frame.MRDiffusionSequence = Sequence([echo]), Sequence([diffusion])
        frame.PixelValueTransformationSequence = Sequence([transform])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.arange(32, dtype="<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize("multi_frame", [True, False], ids=["enhanced", "classic"])
def test_every_attribute_ingestion_reads_survives_the_allow_list(tmp_path: Path, multi_frame: bool) -> None:
    ds = enhanced_mr()
    if not multi_frame:  # one classic slice: the same attributes at the top level
        del ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence, ds.NumberOfFrames
        ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [.5, .5]
        ds.SliceThickness, ds.SpacingBetweenSlices, ds.EchoNumbers, ds.DiffusionBValue = 2, 2, 1, 500
        ds.TemporalPositionIdentifier, ds.PixelData = 1, ds.PixelData[:32]
    clean = pydicom.dcmread(io.BytesIO(_written(deidentify(ds, KEY))))
    read = [k for k in HEADER_TAGS if isinstance(k, str) and k in ds and k not in ("SeriesDescription",)]
    for keyword in read:
        expected = remap_uid(ds[keyword].value, KEY) if keyword.endswith("InstanceUID") else ds[keyword].value
        assert clean[keyword].value == expected, keyword
    assert acquisition_fields(clean) == acquisition_fields(ds)

    def headers(dataset: Dataset) -> list[dict]:
        ignored = {"path", "dataset", "study_uid", "series_uid"}
        return [{k: v for k, v in dataclasses.asdict(h).items() if k not in ignored}
                for h in read_slice_headers(tmp_path / "x.dcm", dataset)]
    assert headers(clean) == headers(ds)
