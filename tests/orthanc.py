"""A real Orthanc PACS for tests: started on free loopback ports, loaded with DICOM files, stopped at exit.

``running_orthanc`` writes a configuration into a temporary folder (storage and index there too), starts
``/usr/sbin/Orthanc`` with the DICOMweb plugin, waits (bounded) for its REST API to answer, uploads the
given files through ``POST /instances`` and terminates the server when the ``with`` block ends.

Orthanc 1.10 has no option to bind its DICOM port to one interface, so the configuration closes it
instead: the called AE title is checked, unknown calling AE titles may do nothing (not even C-ECHO or
C-STORE) and the one registered modality must connect from 127.0.0.1. HTTP is loopback-only
(``RemoteAccessAllowed: false``).

Tests call :func:`require_orthanc` first; it skips them when Orthanc is not installed
(``apt-get install orthanc orthanc-dicomweb``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
LOOPBACK = "127.0.0.1"
ORTHANC_AET = "ORTHANC"
DICOMWEB_ROOT = "/dicom-web/"


def require_orthanc() -> None:
    """Skip the calling test when the Orthanc binary or its DICOMweb plugin is missing."""
    for path, package in ((ORTHANC_BINARY, "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not path.exists():
            pytest.skip(f"{path} not found: install the Debian package {package} to run the PACS tests")


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """Ask a server subprocess to stop, kill it after ``grace_s`` seconds, and reap it either way."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    """Where a running test Orthanc answers."""

    http_port: int
    dicom_port: int
    aet: str
    log: Path

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.rest_url + DICOMWEB_ROOT.rstrip("/")

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through the REST API; returns Orthanc's instance id."""
        request = urllib.request.Request(self.rest_url + "/instances", data=data, method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc did not store the instance: {answer}")
        return answer["ID"]


def orthanc_config(root: Path, http_port: int, dicom_port: int, modalities: dict[str, tuple[str, int]]) -> dict:
    """The JSON configuration of a loopback-only test Orthanc.

    Args:
        root: folder for storage and index.
        http_port: REST / DICOMweb port.
        dicom_port: DICOM (DIMSE) port.
        modalities: AE title -> (host, port) of peers allowed to query and retrieve (C-MOVE destinations).

    Returns:
        The configuration as a dict, ready for ``json.dumps``.
    """
    return {
        "Name": "medtl-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {aet.lower(): [aet, host, port] for aet, (host, port) in modalities.items()},
        "DicomScuTimeout": 10,
        "DicomAssociationCloseDelay": 0,
        "SynchronousCMove": True,
        "SaveJobs": False,
        "HttpThreadsCount": 4,
        "DicomThreadsCount": 2,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False},
    }


def _wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer {url} within {timeout_s:g} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


@contextmanager
def running_orthanc(root: Path, files: Iterable[bytes] = (), *, modalities: dict[str, tuple[str, int]] | None = None,
                    http_port: int | None = None, dicom_port: int | None = None,
                    start_timeout_s: float = 30.0) -> Iterator[Orthanc]:
    """Run a loopback-only Orthanc holding ``files`` for the duration of the ``with`` block.

    Args:
        root: empty folder for the configuration, storage, index and log.
        files: DICOM Part 10 files to upload once the server is up.
        modalities: AE title -> (host, port) of the DICOM peers allowed to query / retrieve / be moved to.
        http_port, dicom_port: fixed ports (default: free ones chosen by the OS).
        start_timeout_s: how long to wait for the REST API to answer.

    Yields:
        An :class:`Orthanc` describing where it listens.

    Raises:
        RuntimeError: when Orthanc exits early or does not answer in time (with the tail of its log).
    """
    require_orthanc()
    root.mkdir(parents=True, exist_ok=True)
    server = Orthanc(http_port=http_port or free_port(), dicom_port=dicom_port or free_port(), aet=ORTHANC_AET,
                     log=root / "orthanc.log")
    config = root / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(root, server.http_port, server.dicom_port, modalities or {}),
                                 indent=2))
    with server.log.open("wb") as log:
        process = subprocess.Popen([str(ORTHANC_BINARY), str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=root)
    try:
        _wait_until_up(process, server.rest_url + "/system", server.log, start_timeout_s)
        for data in files:
            server.upload(data)
        yield server
    finally:
        stop_process(process, grace_s=15)
