"""Ingestion survives being killed, hostile folder contents and media indexes, and accounts for every file."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from medtl.config import IngestConfig
from medtl.ingest import ingest_folder, load_ledger
from medtl.synth import write_cohort
from medtl.workspace import Workspace
from tests.test_synth import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom")
    write_cohort(tiny_config(), root)
    return root


def outputs(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under the ingest folder."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


_KILLABLE_RUN = textwrap.dedent("""
    import sys
    import medtl.ingest.folder as folder
    from medtl.config import IngestConfig
    from medtl.workspace import Workspace
    folder.CHECKPOINT_SECONDS = 0.0  # write the tables after every file: the most states to be killed in
    folder.ingest_folder(IngestConfig(input_dir=sys.argv[1], image_size=32, workers=2), Workspace(sys.argv[2]))
""")


@pytest.mark.timeout(300)
def test_run_killed_at_any_point_then_rerun_equals_uninterrupted_run(cohort: Path, tmp_path: Path) -> None:
    reference = Workspace(tmp_path / "reference")
    ingest_folder(IngestConfig(input_dir=cohort, image_size=32, workers=2), reference)
    expected = outputs(reference.ingest)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(ws: Workspace) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _KILLABLE_RUN, str(cohort), str(ws.root)], env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    t0 = time.perf_counter()
    assert start(Workspace(tmp_path / "timing")).wait(timeout=120) == 0
    duration = time.perf_counter() - t0  # kill points are spread over what a whole run takes here

    killed_mid_run = 0
    for i, fractions in enumerate([(0.15,), (0.3,), (0.45,), (0.6,), (0.75,), (0.9,), (0.5, 0.3)]):
        ws = Workspace(tmp_path / f"killed_{i}")
        for fraction in fractions:  # (0.5, 0.3): a resumed run is killed again
            proc = start(ws)
            time.sleep(fraction * duration)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as a scheduler would
                killed_mid_run += 1
            proc.wait(timeout=60)
        ingest_folder(IngestConfig(input_dir=cohort, image_size=32, workers=2), ws)
        assert outputs(ws.ingest) == expected, f"killed at {fractions} of a run: outputs differ from the reference"
    assert killed_mid_run >= 6, "the runs finished before being killed; the test did not exercise interruption"


def test_symlink_out_of_the_input_folder_is_accounted_for_and_never_followed(cohort: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.dcm"
    secret.parent.mkdir()
    secret.write_bytes(next(cohort.rglob("*.dcm")).read_bytes())
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "link.dcm").symlink_to(secret)
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(IngestConfig(input_dir=folder, image_size=32), ws)

    ledger = load_ledger(ws)
    assert (summary.files_in, summary.skipped, summary.ingested) == (1, 1, 0)
    assert ledger.loc[0, "status"] == "skipped"
    assert ledger.loc[0, "reason"].startswith("symbolic link leaving the input folder: not followed")
    assert not any(ws.quarantine.iterdir()), "the link's target must not be copied into the quarantine"
    again = ingest_folder(IngestConfig(input_dir=folder, image_size=32), ws)
    assert again.skipped_already_done == 1


def _dicomdir(path: Path, file_ids: list[list[str]]) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "HOSTILE"
    records = []
    for parts in file_ids:
        record = Dataset()
        record.DirectoryRecordType = "IMAGE"
        record.ReferencedFileID = parts
        records.append(record)
    ds.DirectoryRecordSequence = Sequence(records)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # hostile on purpose
def test_dicomdir_is_quarantined_and_its_file_ids_are_never_opened_nor_quoted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "media"
    folder.mkdir()
    _dicomdir(folder / "DICOMDIR", [["DOE_JANE", "IM0001"], ["..", "..", "etc", "passwd"]])
    ws = Workspace(tmp_path / "work")

    with caplog.at_level(logging.DEBUG, logger="medtl"):
        summary = ingest_folder(IngestConfig(input_dir=folder, image_size=32), ws)

    reason = load_ledger(ws).loc[0, "reason"]
    assert (summary.files_in, summary.quarantined) == (1, 1)
    assert reason.startswith("DICOMDIR") and "DICOMDIRs are not ingested" in reason
    assert "2 referenced files" in reason and "1 of its file IDs point outside the folder" in reason
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("medtl")]
    for text in [reason, *logged]:  # file IDs are paths of the source system, often named after patients
        assert not any(part in text for part in ("DOE_JANE", "IM0001", "passwd", "../")), text
    assert pydicom.dcmread(folder / "DICOMDIR").FileSetID == "HOSTILE"  # the input is never modified


def test_partial_files_of_an_interrupted_run_are_removed(cohort: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "work")
    (ws.ingest / "arrays").mkdir(parents=True)
    leftover = ws.ingest / "arrays" / ".1.2.3.npy.tmp"
    leftover.write_bytes(b"half an array")

    ingest_folder(IngestConfig(input_dir=cohort, image_size=32), ws)

    assert not leftover.exists()
    assert not [p for p in ws.ingest.rglob("*.tmp")]


def _tree(root: Path, skip: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_relative_to(skip)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hostile_corpus_is_quarantined_file_by_file_and_nothing_escapes_the_output(tmp_path: Path,
                                                                                  spatial_dims: int) -> None:
    from tests.hostile_corpus import write_hostile_corpus

    corpus = tmp_path / "hostile"
    corpus.mkdir()
    expected = write_hostile_corpus(corpus)
    ws = Workspace(tmp_path / "work")
    before = _tree(tmp_path, ws.root)

    summary = ingest_folder(IngestConfig(input_dir=corpus, image_size=32, workers=2, worker_memory_mb=1024, max_decoded_mib=256,
                                         spatial_dims=spatial_dims), ws)

    reasons = dict(zip(load_ledger(ws)["path"], load_ledger(ws)["reason"]))
    assert summary.files_in == summary.quarantined == len(expected)
    for name, keyword in expected.items():
        assert keyword.lower() in reasons[name].lower(), f"{name}: {reasons[name]!r} lacks {keyword!r}"
    assert _tree(tmp_path, ws.root) == before, "ingestion wrote or changed files outside its workdir"
    assert not (ws.ingest / "arrays").exists() or not any((ws.ingest / "arrays").iterdir())
