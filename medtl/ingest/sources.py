"""PACS sources: pull the studies a query matches into a local folder, which ``ingest_folder`` then ingests.

Two protocols, one algorithm (:func:`pull`): search the studies, list each study's instances, retrieve
the ones not yet on disk, check that they all arrived.

* DICOMweb (DICOM PS3.18) with dicomweb-client: QIDO-RS searches, WADO-RS retrieves (in the stored
  transfer syntax, ``transfer-syntax=*``, so the PACS does not transcode).
* DIMSE (DICOM PS3.4 Annex C, PS3.7) with pynetdicom: C-FIND (Study Root) searches; C-GET brings the
  instances back on the same association, or C-MOVE makes the PACS send them to our storage SCP, which
  listens for the whole pull (the PACS must know ``calling_ae_title`` at our host and ``move_port``).

Every instance lands in the destination as ``<SOPInstanceUID>.dcm``: written to a staging folder next
to it, flushed to disk, then moved in with ``os.replace``; so the destination never holds a partial file
and a re-pull skips every instance already there. De-identification and accounting stay in ingestion:
the pulled folder holds identifiable data and must be protected like the PACS itself.

Errors are either transient — connection refused / reset, timeouts, HTTP 5xx / 408 / 429, DIMSE association
rejected-transient or aborted, "out of resources" statuses, instances that did not arrive — and retried
with exponential backoff (before retry *k*: ``min(backoff_max_s, backoff_base_s * 2**k)`` seconds), or
permanent — HTTP 4xx, association rejected-permanent, a refused query, missing credentials — and raised at
once as :class:`PermanentPacsError`, whose message says what to fix.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)
from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS, QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

from medtl.config import PacsConfig, PacsQuery

logger = logging.getLogger("medtl.ingest.pacs")

T = TypeVar("T")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_QIDO_PAGE = 500
_MAX_INSTANCES_PER_STUDY = 200_000
_MAX_PRESENTATION_CONTEXTS = 128  # DICOM PS3.8 9.3.2.2: context IDs are the odd numbers 1..255
# One C-GET presentation context per group, so the PACS can send each instance in its stored transfer
# syntax instead of transcoding it (a lossy-compressed instance decoded and re-encoded is not the original).
_GET_SYNTAX_GROUPS: tuple[tuple[str, ...], ...] = (
    (dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian),
    (dicom_uid.JPEGBaseline8Bit,), (dicom_uid.JPEGExtended12Bit,), (dicom_uid.JPEGLosslessSV1,),
    (dicom_uid.JPEGLSLossless,), (dicom_uid.JPEGLSNearLossless,), (dicom_uid.JPEG2000Lossless,),
    (dicom_uid.JPEG2000,), (dicom_uid.RLELossless,), (dicom_uid.DeflatedExplicitVRLittleEndian,),
)
_PENDING, _SUCCESS, _WARNING = (0xFF00, 0xFF01), 0x0000, 0xB000
_STATUS_TEXT = {**QR_FIND_SERVICE_CLASS_STATUS, **QR_GET_SERVICE_CLASS_STATUS, **QR_MOVE_SERVICE_CLASS_STATUS}


class PacsError(RuntimeError):
    """A pull from a PACS failed."""


class TransientPacsError(PacsError):
    """A failure that may go away when the operation is tried again (it is retried with backoff)."""


class PermanentPacsError(PacsError):
    """A failure that trying again cannot fix (configuration, credentials, query); never retried."""


@dataclass(frozen=True)
class Instance:
    """One instance of a study, as the PACS listed it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class RetryRecord:
    """One transient failure that was retried."""

    operation: str
    attempt: int
    delay_s: float
    error: str


@dataclass
class PullReport:
    """What one :func:`pull` did. ``instances = already_present + written`` when every listed instance
    arrived (``written`` also counts instances a PACS sent unasked)."""

    destination: Path
    studies: list[str] = field(default_factory=list)
    instances: int = 0
    already_present: int = 0
    written: int = 0
    retries: list[RetryRecord] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{len(self.studies)} studies, {self.instances} instances: {self.already_present} already present, "
                f"{self.written} written to {self.destination} ({len(self.retries)} retries)")


# ---------------------------------------------------------------------------------------------- retries


def backoff_delay(retry: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): ``min(max_s, base_s * 2**retry)``.

    Args:
        retry: how many retries came before this one.
        base_s: the first wait.
        max_s: the longest wait.

    Returns:
        The wait in seconds.
    """
    return min(max_s, base_s * 2.0 ** min(retry, 64))


def call_with_retries(operation: Callable[[], T], what: str, cfg: PacsConfig, log: list[RetryRecord],
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``operation``, retrying it with exponential backoff while it raises :class:`TransientPacsError`.

    Args:
        operation: the call to make; it must be safe to repeat.
        what: what it does, for messages ("retrieve study 1.2.3").
        cfg: ``retries``, ``backoff_base_s`` and ``backoff_max_s``.
        log: every retry is appended here.
        sleep: how to wait (tests pass a recorder).

    Returns:
        What ``operation`` returned.

    Raises:
        TransientPacsError: when the last of ``cfg.retries + 1`` attempts failed too.
        PermanentPacsError: at once, from ``operation``.
    """
    for attempt in range(cfg.retries + 1):
        try:
            return operation()
        except TransientPacsError as exc:
            if attempt == cfg.retries:
                raise TransientPacsError(f"{what}: still failing after {attempt + 1} attempts: {exc}; check that "
                                         "the PACS is up and reachable, or raise pacs.retries") from exc
            delay = backoff_delay(attempt, cfg.backoff_base_s, cfg.backoff_max_s)
            log.append(RetryRecord(operation=what, attempt=attempt + 1, delay_s=delay, error=str(exc)))
            logger.warning("%s: attempt %d failed (%s); retrying in %.2f s", what, attempt + 1, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


# ------------------------------------------------------------------------------------------ destination


class InstanceFolder:
    """The pull's destination: one DICOM Part 10 file per SOPInstanceUID, ``<root>/<SOPInstanceUID>.dcm``.

    Files are written in a staging folder beside ``root`` (``.<root name>.partial``, emptied on opening)
    and moved in with ``os.replace``, so ``root`` only ever holds complete files. Thread-safe (the C-MOVE
    storage SCP writes from its own threads).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._staging = self.root.parent / f".{self.root.name}.partial"
        shutil.rmtree(self._staging, ignore_errors=True)
        for folder in (self.root, self._staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.written = 0

    def path(self, sop_uid: str) -> Path:
        """Where the instance ``sop_uid`` is stored.

        Raises:
            PermanentPacsError: when ``sop_uid`` is not a DICOM UID (it would not be a safe file name).
        """
        if not (isinstance(sop_uid, str) and len(sop_uid) <= 64 and _UID.match(sop_uid)):
            raise PermanentPacsError(f"the PACS gave SOPInstanceUID {sop_uid!r}, which is not a DICOM UID "
                                     "(digits and dots, at most 64 characters); report it to the PACS administrator")
        return self.root / f"{sop_uid}.dcm"

    def has(self, sop_uid: str) -> bool:
        """Whether the instance is already stored."""
        return self.path(sop_uid).is_file()

    def write(self, sop_uid: str, data: bytes) -> bool:
        """Store one instance unless it is already there.

        Args:
            sop_uid: its SOPInstanceUID.
            data: the DICOM Part 10 file.

        Returns:
            True when written, False when it was already present.
        """
        target = self.path(sop_uid)
        if target.is_file():
            return False
        fd, tmp = tempfile.mkstemp(dir=self._staging, suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            self.written += 1
        return True

    def close(self) -> None:
        """Remove the (empty) staging folder."""
        shutil.rmtree(self._staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ query


def study_filters(query: PacsQuery) -> list[dict[str, str]]:
    """The query as DICOM attribute filters: one mapping per requested StudyInstanceUID, else one.

    Args:
        query: the ``pacs.query`` section.

    Returns:
        Keyword → value mappings (DICOM PS3.4 C.2.2.2 matching: ``YYYYMMDD-YYYYMMDD`` date ranges,
        ``*`` / ``?`` wildcards), usable as QIDO-RS parameters and C-FIND identifiers alike.
    """
    filters: dict[str, str] = {}
    if query.patient_id:
        filters["PatientID"] = query.patient_id
    if query.study_date_from or query.study_date_to:
        first, last = (f"{d:%Y%m%d}" if d else "" for d in (query.study_date_from, query.study_date_to))
        filters["StudyDate"] = f"{first}-{last}"
    if query.modality:
        filters["ModalitiesInStudy"] = query.modality
    if query.accession_number:
        filters["AccessionNumber"] = query.accession_number
    return [{**filters, "StudyInstanceUID": uid} for uid in query.study_instance_uids] or [filters]


class PacsSource(Protocol):
    """A PACS that can be searched and retrieved from (DICOMweb or DIMSE)."""

    def find_studies(self, filters: dict[str, str], cap: int) -> list[str]:
        """StudyInstanceUIDs matching ``filters`` (stops after more than ``cap``)."""

    def find_instances(self, study_uid: str) -> list[Instance]:
        """Every instance of one study."""

    def retrieve(self, study_uid: str, instances: list[Instance], whole_study: bool) -> None:
        """Bring ``instances`` (all of the study when ``whole_study``) into the destination folder."""

    def close(self) -> None:
        """Release connections and listeners."""


# ---------------------------------------------------------------------------------------------- pulling


def pull(cfg: PacsConfig, dest: Path, *, sleep: Callable[[float], None] = time.sleep) -> PullReport:
    """Pull every instance of the studies ``cfg.query`` matches into ``dest`` (skipping those already there).

    Args:
        cfg: the ``ingest.pacs`` section.
        dest: destination folder, created if missing; holds ``<SOPInstanceUID>.dcm`` files.
        sleep: how to wait between retries.

    Returns:
        A :class:`PullReport`.

    Raises:
        PermanentPacsError: at once, for errors that retrying cannot fix.
        TransientPacsError: when an operation still fails after ``cfg.retries`` retries.
    """
    folder = InstanceFolder(dest)
    report = PullReport(destination=folder.root)
    retrying = partial(call_with_retries, cfg=cfg, log=report.retries, sleep=sleep)
    try:
        with _open_source(cfg, folder) as source:
            _pull_studies(source, folder, cfg.query, report, retrying)
    finally:
        folder.close()
    report.written = folder.written
    logger.info("pacs: %s", report)
    return report


def _pull_studies(source: PacsSource, folder: InstanceFolder, query: PacsQuery, report: PullReport,
                  retrying: Callable[..., object]) -> None:
    for filters in study_filters(query):
        found = retrying(partial(source.find_studies, filters, query.max_studies),
                         f"search studies by {_keys(filters)}")
        report.studies.extend(uid for uid in found if uid not in report.studies)
        if len(report.studies) > query.max_studies:
            raise PermanentPacsError(f"pacs.query matches more than pacs.query.max_studies={query.max_studies} "
                                     "studies; narrow the filters or raise max_studies")
    if not report.studies:
        logger.warning("pacs: no study matches pacs.query")
    for study_uid in report.studies:
        instances = retrying(partial(source.find_instances, study_uid), f"list instances of study {study_uid}")
        present = sum(folder.has(i.sop_uid) for i in instances)
        report.instances += len(instances)
        report.already_present += present
        if present < len(instances):
            retrying(partial(_retrieve_missing, source, folder, study_uid, instances), f"retrieve study {study_uid}")


def _retrieve_missing(source: PacsSource, folder: InstanceFolder, study_uid: str, instances: list[Instance]) -> None:
    """One retrieval attempt of the instances still missing; incomplete arrival is a transient error."""
    missing = [i for i in instances if not folder.has(i.sop_uid)]
    if not missing:
        return
    source.retrieve(study_uid, missing, whole_study=len(missing) == len(instances))
    lost = [i.sop_uid for i in missing if not folder.has(i.sop_uid)]
    if lost:
        raise TransientPacsError(f"{len(lost)} of {len(missing)} requested instances did not arrive "
                                 f"(first: {lost[0]})")


@contextmanager
def _open_source(cfg: PacsConfig, folder: InstanceFolder) -> Iterator[PacsSource]:
    source: PacsSource = DicomWebSource(cfg, folder) if cfg.protocol == "dicomweb" else DimseSource(cfg, folder)
    try:
        yield source
    finally:
        source.close()


def _keys(filters: dict[str, str]) -> str:
    """The filters' attribute names only: messages and logs must not carry patient IDs."""
    return ", ".join(filters) or "nothing"


def _environment_secret(variable: str, field_name: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise PermanentPacsError(f"environment variable {variable} (named by pacs.{field_name}) is not set; "
                                 "export it before pulling")
    return value


# --------------------------------------------------------------------------------------------- DICOMweb


_TRANSIENT_HTTP = frozenset({408, 429, *range(500, 600)})
_HTTP_HINTS = {
    400: "the PACS refused the request; check pacs.query",
    401: "check the credentials in the environment variables named by pacs.username_env / password_env / token_env",
    403: "the credentials are not allowed to read these studies; ask the PACS administrator",
    404: "check that pacs.url is the DICOMweb root (e.g. https://pacs.example.org/dicom-web)",
}
_STORED_SYNTAX = (("application/dicom", "*"),)


@contextmanager
def _http_errors(what: str) -> Iterator[None]:
    """Turn requests' exceptions into transient / permanent PACS errors."""
    try:
        yield
    except requests.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        # the URL's query string is left out: it holds the search filters (patient IDs)
        url = response.url.split("?")[0] if response is not None else "?"
        text = f"{what}: HTTP {status} {response.reason if response is not None else ''} from {url}"
        if status in _TRANSIENT_HTTP:
            raise TransientPacsError(text) from exc
        raise PermanentPacsError(f"{text}; {_HTTP_HINTS.get(status, 'the PACS refused the request')}") from exc
    except requests.exceptions.SSLError as exc:
        raise PermanentPacsError(f"{what}: TLS failure ({exc}); check the PACS certificate and pacs.url") from exc
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise TransientPacsError(f"{what}: {type(exc).__name__}: {exc}") from exc


class DicomWebSource:
    """QIDO-RS search and WADO-RS retrieval through dicomweb-client (its own retries are off: ours decide)."""

    def __init__(self, cfg: PacsConfig, folder: InstanceFolder) -> None:
        auth = None
        if cfg.username_env and cfg.password_env:
            auth = (_environment_secret(cfg.username_env, "username_env"),
                    _environment_secret(cfg.password_env, "password_env"))
        token = _environment_secret(cfg.token_env, "token_env") if cfg.token_env else None
        session = self._session = requests.Session()
        session.auth = auth
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        self._client = DICOMwebClient(url=cfg.url, session=session, timeout=(cfg.connect_timeout_s, cfg.timeout_s))
        self._client.set_http_retry_params(retry=False)
        self._folder = folder

    def find_studies(self, filters: dict[str, str], cap: int) -> list[str]:
        with _http_errors(f"QIDO-RS study search by {_keys(filters)}"):
            return [_attribute(ds, "StudyInstanceUID") for ds in
                    self._search(self._client.search_for_studies, "StudyInstanceUID", cap, search_filters=filters)]

    def find_instances(self, study_uid: str) -> list[Instance]:
        with _http_errors(f"QIDO-RS instance search in study {study_uid}"):
            found = self._search(self._client.search_for_instances, "SOPInstanceUID", _MAX_INSTANCES_PER_STUDY,
                                 study_instance_uid=study_uid)
        return [Instance(study_uid, _attribute(ds, "SeriesInstanceUID"), _attribute(ds, "SOPInstanceUID"),
                         _attribute(ds, "SOPClassUID")) for ds in found]

    @staticmethod
    def _search(search: Callable[..., list[dict]], key: str, cap: int, **kwargs) -> list[Dataset]:
        """Page through a QIDO-RS search with limit/offset until a page brings nothing new or more than
        ``cap`` results are in (bounded even when a server ignores ``offset``)."""
        found: dict[str, Dataset] = {}
        while len(found) <= cap:
            page = [Dataset.from_json(row) for row in search(offset=len(found), limit=_QIDO_PAGE, **kwargs)]
            fresh = {_attribute(ds, key): ds for ds in page if ds.get(key) not in found}
            if not fresh:
                break
            found.update(fresh)
        return list(found.values())

    def retrieve(self, study_uid: str, instances: list[Instance], whole_study: bool) -> None:
        with _http_errors(f"WADO-RS retrieve of study {study_uid}"):
            if whole_study:
                datasets = self._client.iter_study(study_uid, media_types=_STORED_SYNTAX)
            else:
                datasets = (self._client.retrieve_instance(i.study_uid, i.series_uid, i.sop_uid,
                                                           media_types=_STORED_SYNTAX) for i in instances)
            for ds in datasets:
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
                self._folder.write(_attribute(ds, "SOPInstanceUID"), buffer.getvalue())

    def close(self) -> None:
        self._session.close()


def _attribute(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise PermanentPacsError(f"the PACS answered without {keyword}, which the DICOM standard requires here "
                                 "(PS3.4 C.3 / PS3.18 6.7); report it to the PACS administrator")
    return str(value)


# ------------------------------------------------------------------------------------------------ DIMSE


class DimseSource:
    """C-FIND search and C-GET / C-MOVE retrieval through pynetdicom; one association per operation.

    For C-MOVE a storage SCP listens on ``move_bind_address:move_port`` from construction to :meth:`close`,
    accepting associations only from the PACS's AE title.
    """

    def __init__(self, cfg: PacsConfig, folder: InstanceFolder) -> None:
        self._cfg = cfg
        self._folder = folder
        self._peer = f"{cfg.called_ae_title}@{cfg.host}:{cfg.port}"
        self._scp = None
        if cfg.retrieve == "c-move":
            ae = self._new_ae()
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            ae.require_calling_aet = [cfg.called_ae_title]
            try:
                self._scp = ae.start_server((cfg.move_bind_address, cfg.move_port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
            except OSError as exc:
                raise PermanentPacsError(f"cannot listen on {cfg.move_bind_address}:{cfg.move_port} for C-MOVE "
                                         f"({exc}); free the port or change pacs.move_port") from exc

    def _new_ae(self) -> AE:
        ae = AE(ae_title=self._cfg.calling_ae_title)
        ae.connection_timeout = self._cfg.connect_timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._cfg.timeout_s
        return ae

    @contextmanager
    def _association(self, contexts: list[PresentationContext], roles: Sequence[object] = (),
                     handlers: Sequence[tuple] = ()) -> Iterator[Association]:
        ae = self._new_ae()
        ae.requested_contexts = contexts
        assoc = ae.associate(self._cfg.host, self._cfg.port, ae_title=self._cfg.called_ae_title,
                             ext_neg=list(roles) or None, evt_handlers=list(handlers) or None)
        try:
            if not assoc.is_established:
                raise self._association_error(assoc)
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()

    def _association_error(self, assoc: Association) -> PacsError:
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            text = (f"{self._peer} rejected the association ({answer.result_str}, {answer.source_str}: "
                    f"{answer.reason_str})")
            if answer.result == 0x02:
                return TransientPacsError(text)
            return PermanentPacsError(f"{text}; check pacs.called_ae_title and that the PACS accepts calling AE "
                                      f"title {self._cfg.calling_ae_title!r} from this host")
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return PermanentPacsError(f"{self._peer} accepted none of the proposed presentation contexts "
                                      f"({sorted({c.abstract_syntax.name for c in assoc.rejected_contexts})})")
        return TransientPacsError(f"no association with {self._peer}: connection refused, reset or timed out")

    def _find(self, assoc: Association, identifier: Dataset, what: str, cap: int) -> list[Dataset]:
        found = []
        for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if _check_status(status, what) in _PENDING and answer is not None:
                found.append(answer)
                if len(found) > cap:
                    assoc.abort()
                    break
        return found

    def find_studies(self, filters: dict[str, str], cap: int) -> list[str]:
        identifier = _identifier("STUDY", **{"StudyInstanceUID": "", **filters})
        with self._association([build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
            return [_attribute(ds, "StudyInstanceUID")
                    for ds in self._find(assoc, identifier, f"C-FIND of studies by {_keys(filters)}", cap)]

    def find_instances(self, study_uid: str) -> list[Instance]:
        # series first, then instances per series: the hierarchical query every SCP must support (PS3.4 C.4.1.3.1)
        instances = []
        with self._association([build_context(StudyRootQueryRetrieveInformationModelFind)]) as assoc:
            series = self._find(assoc, _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""),
                                f"C-FIND of the series of study {study_uid}", _MAX_INSTANCES_PER_STUDY)
            for series_uid in (_attribute(ds, "SeriesInstanceUID") for ds in series):
                identifier = _identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                                         SOPInstanceUID="", SOPClassUID="")
                for ds in self._find(assoc, identifier, f"C-FIND of the instances of series {series_uid}",
                                     _MAX_INSTANCES_PER_STUDY):
                    instances.append(Instance(study_uid, series_uid, _attribute(ds, "SOPInstanceUID"),
                                              _attribute(ds, "SOPClassUID")))
        return instances

    def retrieve(self, study_uid: str, instances: list[Instance], whole_study: bool) -> None:
        if whole_study:
            identifiers = [_identifier("STUDY", StudyInstanceUID=study_uid)]
        else:
            identifiers = [_identifier("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=i.series_uid,
                                       SOPInstanceUID=i.sop_uid) for i in instances]
        what = f"{self._cfg.retrieve.upper()} of study {study_uid}"
        if self._cfg.retrieve == "c-move":
            with self._association([build_context(StudyRootQueryRetrieveInformationModelMove)]) as assoc:
                for identifier in identifiers:
                    for status, _ in assoc.send_c_move(identifier, self._cfg.calling_ae_title,
                                                       StudyRootQueryRetrieveInformationModelMove):
                        _check_status(status, what)
            return
        sop_classes = sorted({i.sop_class_uid for i in instances})
        contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
        contexts += [build_context(sop_class, list(group)) for sop_class in sop_classes for group in _GET_SYNTAX_GROUPS]
        if len(contexts) > _MAX_PRESENTATION_CONTEXTS:
            raise PermanentPacsError(f"study {study_uid} holds {len(sop_classes)} SOP classes, more than one C-GET "
                                     "association can negotiate; use pacs.retrieve: c-move or protocol: dicomweb")
        roles = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
        with self._association(contexts, roles, [(evt.EVT_C_STORE, self._on_store)]) as assoc:
            for identifier in identifiers:
                for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                    _check_status(status, what)

    def _on_store(self, event: evt.Event) -> int:
        """C-STORE handler (C-GET sub-operations and the C-MOVE SCP): store the file as received."""
        try:
            self._folder.write(str(event.request.AffectedSOPInstanceUID), event.encoded_dataset())
        except PermanentPacsError as exc:
            logger.error("pacs: refused an instance: %s", exc)
            return 0xC000  # cannot understand
        except OSError as exc:
            logger.error("pacs: cannot store an instance: %s", exc)
            return 0xA700  # out of resources
        return _SUCCESS

    def close(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None


def _identifier(level: str, **attributes: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _check_status(status: Dataset, what: str) -> int:
    """The status code of a C-FIND / C-GET / C-MOVE response, or the PACS error it stands for.

    Raises:
        TransientPacsError: no response (connection lost, DIMSE timeout), out of resources, cancelled.
        PermanentPacsError: any other failure (unknown move destination, refused or malformed query).
    """
    if "Status" not in status:
        raise TransientPacsError(f"{what}: no response from the PACS (connection lost or DIMSE timeout)")
    code = int(status.Status)
    if code in _PENDING or code in (_SUCCESS, _WARNING):
        return code
    description = _STATUS_TEXT.get(code, ("Failure", "unknown status"))[1]
    comment = f" ({status.ErrorComment})" if status.get("ErrorComment") else ""
    text = f"{what}: status 0x{code:04X} {description}{comment}"
    if 0xA700 <= code <= 0xA7FF or code == 0xFE00:
        raise TransientPacsError(text)
    if code == 0xA801:
        raise PermanentPacsError(f"{text}; the PACS does not know our C-MOVE destination: register "
                                 "pacs.calling_ae_title with this host and pacs.move_port in the PACS")
    raise PermanentPacsError(f"{text}; check pacs.query and pacs.called_ae_title")
