"""PACS sources against a real Orthanc on loopback: DICOMweb (QIDO-RS + WADO-RS) and DIMSE (C-FIND + C-GET /
C-MOVE) pulls, idempotent re-pulls, retries with backoff on transient failures, fast failure on permanent
ones, and ingestion of a pull through ``run_ingest``."""

from __future__ import annotations

import io
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, RLELossless,
                         generate_uid)
from pydantic import ValidationError

from medtl.config import IngestConfig, PacsConfig, PacsQuery
from medtl.ingest import load_ledger, load_manifest
from medtl.ingest.deid import resolve_secret, site_label
from medtl.ingest.sources import (DicomWebSource, DimseSource, InstanceFolder, PermanentPacsError,
                                  TransientPacsError, backoff_delay, pull, study_filters)
from medtl.stages import run_ingest
from medtl.workspace import Workspace
from tests.orthanc import LOOPBACK, Orthanc, free_port, require_orthanc, running_orthanc

pytestmark = pytest.mark.timeout(120)

OUR_AET = "MEDTL"
# The last CT instance is stored RLE-compressed, to check that no retrieval path transcodes.
#          patient   study  date        modality sop class                              instances per series
CORPUS = [("PAT001", "s1", "20210301", "DX", DigitalXRayImageStorageForPresentation, (2, 1)),
          ("PAT001", "s2", "20220510", "DX", DigitalXRayImageStorageForPresentation, (1,)),
          ("PAT002", "s3", "20210715", "CT", CTImageStorage, (2,))]


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["medtl-test-pacs", *map(str, parts)]))


def _instance(patient: str, study: str, date: str, modality: str, sop_class: str, series: int, number: int,
              rng: np.random.Generator, compress: bool = False) -> bytes:
    sop_uid = _uid(study, series, number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient, f"Doe^{patient}", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(study), _uid(study, series)
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, "101500", f"ACC{study}"
    ds.Modality, ds.InstitutionName, ds.Manufacturer = modality, "Loopback General Hospital", "TestVendor"
    ds.SeriesNumber, ds.InstanceNumber = series + 1, number + 1
    ds.Rows, ds.Columns = 20, 24
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, size=(20, 24), dtype="<u2").tobytes()
    if compress:
        ds.compress(RLELossless)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus() -> dict[str, dict]:
    """SOPInstanceUID -> {"bytes", "pixels", "patient", "study", "series"} of the test PACS's 6 instances."""
    rng = np.random.default_rng(0)
    out = {}
    for patient, study, date, modality, sop_class, series_sizes in CORPUS:
        for series, size in enumerate(series_sizes):
            for number in range(size):
                data = _instance(patient, study, date, modality, sop_class, series, number, rng,
                                 compress=(study, number) == ("s3", 1))
                ds = pydicom.dcmread(io.BytesIO(data))
                out[ds.SOPInstanceUID] = {"bytes": data, "pixels": ds.PixelData, "patient": patient,
                                          "study": ds.StudyInstanceUID, "syntax": ds.file_meta.TransferSyntaxUID}
    return out


def uids_of(corpus: dict[str, dict], patient: str) -> set[str]:
    return {uid for uid, item in corpus.items() if item["patient"] == patient}


@pytest.fixture(scope="module")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(corpus, move_port, tmp_path_factory) -> Orthanc:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), [item["bytes"] for item in corpus.values()],
                         modalities={OUR_AET: (LOOPBACK, move_port)}) as server:
        yield server


def config(orthanc: Orthanc, method: str, *, move_port: int | None = None, **overrides) -> PacsConfig:
    """A PacsConfig for the test Orthanc; ``method`` is dicomweb, c-get or c-move."""
    values: dict = dict(query={"patient_id": "PAT001"}, retries=2, backoff_base_s=0.01, backoff_max_s=0.02,
                        connect_timeout_s=2, timeout_s=10)
    if method == "dicomweb":
        values.update(protocol="dicomweb", url=orthanc.dicomweb_url)
    else:
        values.update(protocol="dimse", host=LOOPBACK, port=orthanc.dicom_port, called_ae_title=orthanc.aet,
                      calling_ae_title=OUR_AET, retrieve=method)
        if method == "c-move":
            values.update(move_port=move_port, move_bind_address=LOOPBACK)
    values.update(overrides)
    return PacsConfig(**values)


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


class Sleeps(list):
    """Records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class FlakyProxy:
    """TCP proxy on 127.0.0.1 in front of ``target_port`` whose first ``failures`` connections fail, with an
    HTTP 503 answer (``mode="http503"``) or a TCP reset (``mode="reset"``); later ones are forwarded."""

    def __init__(self, target_port: int, failures: int, mode: str) -> None:
        self.target_port, self.failures, self.mode = target_port, failures, mode
        self.failed = 0
        self._server = socket.create_server((LOOPBACK, 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self._server, *self._sockets]:
            sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            if self.failed < self.failures:
                self.failed += 1
                self._fail(client)
                continue
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def _fail(self, client: socket.socket) -> None:
        if self.mode == "http503":
            client.settimeout(2)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    break
                request += chunk
            client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        # shutdown() first: close() alone neither wakes the other pump's blocked recv() nor sends a FIN
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


# --------------------------------------------------------------------------------- pure parts, no server


def test_backoff_doubles_up_to_the_maximum() -> None:
    assert [backoff_delay(k, 0.5, 3.0) for k in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0


def test_query_becomes_dicom_attribute_filters() -> None:
    query = PacsQuery(patient_id="PAT*", study_date_from="2021-01-01", modality="CT",
                      study_instance_uids=["1.2.3", "1.2.4"])
    assert study_filters(query) == [
        {"PatientID": "PAT*", "StudyDate": "20210101-", "ModalitiesInStudy": "CT", "StudyInstanceUID": uid}
        for uid in ("1.2.3", "1.2.4")]
    assert study_filters(PacsQuery(study_date_to="2020-12-31")) == [{"StudyDate": "-20201231"}]


def test_config_refuses_unsafe_or_incomplete_settings() -> None:
    with pytest.raises(ValidationError, match="would pull the whole PACS"):
        PacsQuery()
    with pytest.raises(ValidationError, match="needs \\['move_port'\\]"):
        PacsConfig(protocol="dimse", host=LOOPBACK, port=104, called_ae_title="PACS", retrieve="c-move",
                   query={"patient_id": "x"})
    with pytest.raises(ValidationError, match="do not apply to protocol 'dicomweb'"):
        PacsConfig(protocol="dicomweb", url="http://x/dicom-web", host="x", query={"patient_id": "x"})
    with pytest.raises(ValidationError, match="go together"):
        PacsConfig(protocol="dicomweb", url="http://x/dicom-web", username_env="U", query={"patient_id": "x"})


def test_instance_folder_writes_atomically_and_refuses_unsafe_names(tmp_path: Path) -> None:
    folder = InstanceFolder(tmp_path / "in")
    assert folder.write("1.2.3", b"first") is True
    assert folder.write("1.2.3", b"second") is False
    assert (tmp_path / "in" / "1.2.3.dcm").read_bytes() == b"first"
    with pytest.raises(PermanentPacsError, match="not a DICOM UID"):
        folder.write("../../etc/passwd", b"x")
    folder.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert folder.written == 1


# ---------------------------------------------------------------------------------- against Orthanc


@pytest.mark.parametrize("method", ["dicomweb", "c-get"])
def test_query_matches_exactly_the_requested_studies(orthanc, corpus, tmp_path, method) -> None:
    source_class = DicomWebSource if method == "dicomweb" else DimseSource
    source = source_class(config(orthanc, method), InstanceFolder(tmp_path / "unused"))
    try:
        def studies(**query) -> set[str]:
            return {uid for filters in study_filters(PacsQuery(**query)) for uid in source.find_studies(filters, 10)}

        study_of = {item["study"]: item["patient"] for item in corpus.values()}
        assert studies(patient_id="PAT001") == {s for s, p in study_of.items() if p == "PAT001"}
        assert studies(patient_id="PAT002") == {s for s, p in study_of.items() if p == "PAT002"}
        assert studies(modality="CT") == {s for s, p in study_of.items() if p == "PAT002"}
        assert studies(study_date_from="2021-01-01", study_date_to="2021-12-31") == {_uid("s1"), _uid("s3")}
        assert studies(study_instance_uids=[_uid("s2")]) == {_uid("s2")}
        assert studies(patient_id="NOBODY") == set()
        listed = source.find_instances(_uid("s1"))
        assert {i.sop_uid for i in listed} == {u for u, item in corpus.items() if item["study"] == _uid("s1")}
    finally:
        source.close()


@pytest.mark.parametrize("method", ["dicomweb", "c-get", "c-move"])
def test_pull_fetches_exactly_the_matching_instances_and_repulls_nothing(orthanc, corpus, move_port, tmp_path,
                                                                          method) -> None:
    cfg, dest = config(orthanc, method, move_port=move_port), tmp_path / "incoming"
    expected = uids_of(corpus, "PAT001")

    report = pull(cfg, dest)
    assert {p.name for p in dest.iterdir()} == {f"{uid}.dcm" for uid in expected}
    for uid in expected:
        pulled = pydicom.dcmread(dest / f"{uid}.dcm")
        assert pulled.SOPInstanceUID == uid
        assert pulled.PixelData == corpus[uid]["pixels"]
    assert (len(report.studies), report.instances, report.already_present, report.written) == (2, 3 + 1, 0, 4)
    assert report.retries == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incoming"]  # no staging left behind

    before = snapshot(dest)
    again = pull(cfg, dest)
    assert (again.instances, again.already_present, again.written) == (4, 4, 0)
    assert snapshot(dest) == before

    lost = sorted(expected)[0]
    (dest / f"{lost}.dcm").unlink()
    partial = pull(cfg, dest)
    assert (partial.already_present, partial.written) == (3, 1)
    assert pydicom.dcmread(dest / f"{lost}.dcm").PixelData == corpus[lost]["pixels"]


@pytest.mark.parametrize("method", ["dicomweb", "c-get", "c-move"])
def test_compressed_instance_arrives_as_stored(orthanc, corpus, move_port, tmp_path, method) -> None:
    pull(config(orthanc, method, move_port=move_port, query={"patient_id": "PAT002"}), tmp_path)
    syntaxes = {}
    for uid in uids_of(corpus, "PAT002"):
        pulled = pydicom.dcmread(tmp_path / f"{uid}.dcm")
        assert pulled.PixelData == corpus[uid]["pixels"]
        syntaxes[pulled.file_meta.TransferSyntaxUID] = syntaxes.get(pulled.file_meta.TransferSyntaxUID, 0) + 1
    assert syntaxes == {ExplicitVRLittleEndian: 1, RLELossless: 1}


def test_http_503_is_retried_with_exponential_backoff(orthanc, corpus, tmp_path) -> None:
    with FlakyProxy(orthanc.http_port, failures=2, mode="http503") as proxy:
        url = f"http://{LOOPBACK}:{proxy.port}/dicom-web"
        sleeps = Sleeps()
        report = pull(config(orthanc, "dicomweb", url=url, retries=3), tmp_path / "in", sleep=sleeps)
    assert proxy.failed == 2
    assert {p.stem for p in (tmp_path / "in").iterdir()} == uids_of(corpus, "PAT001")
    assert sleeps == [0.01, 0.02]
    assert [(r.attempt, r.delay_s) for r in report.retries] == [(1, 0.01), (2, 0.02)]
    assert all("HTTP 503" in r.error for r in report.retries)


def test_dimse_connection_reset_is_retried(orthanc, corpus, tmp_path) -> None:
    with FlakyProxy(orthanc.dicom_port, failures=1, mode="reset") as proxy:
        sleeps = Sleeps()
        report = pull(config(orthanc, "c-get", port=proxy.port, query={"patient_id": "PAT002"}), tmp_path / "in",
                      sleep=sleeps)
    assert {p.stem for p in (tmp_path / "in").iterdir()} == uids_of(corpus, "PAT002")
    assert sleeps == [0.01] and len(report.retries) == 1
    assert "no association" in report.retries[0].error


def test_unreachable_pacs_fails_after_the_configured_retries(orthanc, tmp_path) -> None:
    sleeps = Sleeps()
    with pytest.raises(TransientPacsError, match="still failing after 3 attempts.*raise pacs.retries"):
        pull(config(orthanc, "c-get", port=free_port()), tmp_path / "in", sleep=sleeps)
    assert sleeps == [0.01, 0.02]


@pytest.mark.parametrize("case, message", [
    ("http_404", "HTTP 404.*pacs.url is the DICOMweb root"),
    ("wrong_called_ae", "rejected the association.*Called AE title not recognised.*pacs.called_ae_title"),
    ("unknown_calling_ae", "rejected the association.*Calling AE title not recognised"),
    ("missing_credentials", "environment variable MEDTL_TEST_NO_SUCH_VARIABLE .* is not set"),
])
def test_permanent_errors_fail_at_once(orthanc, tmp_path, case, message) -> None:
    cfg = {"http_404": lambda: config(orthanc, "dicomweb", url=orthanc.rest_url + "/no-such-root"),
           "wrong_called_ae": lambda: config(orthanc, "c-get", called_ae_title="NOT-ORTHANC"),
           "unknown_calling_ae": lambda: config(orthanc, "c-get", calling_ae_title="STRANGER"),
           "missing_credentials": lambda: config(orthanc, "dicomweb", token_env="MEDTL_TEST_NO_SUCH_VARIABLE"),
           }[case]()
    sleeps = Sleeps()
    with pytest.raises(PermanentPacsError, match=message):
        pull(cfg, tmp_path / "in", sleep=sleeps)
    if case.endswith("_ae"):
        # Orthanc closes the socket right after its A-ASSOCIATE-RJ; now and then (3 of 40 tries here) pynetdicom
        # sees the close first, which is an abort and rightly retried once; the next try reads the rejection.
        assert len(sleeps) <= 1
    else:
        assert sleeps == []
    assert list((tmp_path / "in").iterdir()) == []


def test_run_ingest_pulls_then_ingests_with_balanced_accounting(orthanc, corpus, tmp_path) -> None:
    ws = Workspace(tmp_path / "work")
    cfg = IngestConfig(image_size=16, pacs=config(orthanc, "dicomweb", query={"study_date_from": "2021-01-01"}))
    result = run_ingest(cfg, ws)
    n = len(corpus)
    assert result["summary"] == f"files in {n} = ingested {n} + quarantined 0 + duplicates 0 (already done 0)"
    manifest, ledger = load_manifest(ws), load_ledger(ws)
    assert len(manifest) == n and (ledger["status"] == "ingested").all()
    assert sorted(ledger["path"]) == sorted(f"{uid}.dcm" for uid in corpus)
    assert set(manifest["hospital"]) == {site_label("Loopback General Hospital", {}, resolve_secret(cfg.deid))}
    assert not set(manifest["patient_id"]) & {"PAT001", "PAT002"}  # de-identified by ingestion
    assert not set(manifest["sop_uid"]) & set(corpus)

    again = run_ingest(cfg, ws)
    assert again["summary"] == f"files in {n} = ingested {n} + quarantined 0 + duplicates 0 (already done {n})"

    with pytest.raises(ValueError, match="both set"):  # refused when the config is loaded, before any work
        type(cfg).model_validate({**cfg.model_dump(), "input_dir": tmp_path})


def test_orthanc_missing_skips(monkeypatch) -> None:
    monkeypatch.setattr("tests.orthanc.ORTHANC_BINARY", Path("/nonexistent/Orthanc"))
    with pytest.raises(pytest.skip.Exception, match="install the Debian package orthanc"):
        require_orthanc()
