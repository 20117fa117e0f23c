"""Every entry of the input folder is accounted for, nothing in it stops a run, and no worker stays poisoned.

Issue 21, classes 4 (folder-name fallback, DICOMDIR file IDs), 5 (whole-run aborts), 6 (a worker poisoned by
one file), 7 (the sparse file's quarantine copy) and 8 (accounting holes), each on files built here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

import medtl.ingest.folder as folder_module
from medtl.config import DeidConfig, IngestConfig
from medtl.ingest import ingest_folder, load_ledger
from medtl.ingest.folder import IngestSummary
from medtl.ingest.manifest import read_manifest
from medtl.ingest.sandbox import is_resource_failure, sandboxed_map
from medtl.ingest.shards import ingest_shard, merge_shards, plan_shards
from medtl.ingest.worker import FileJob, FileResult, WorkerSettings, ingest_file
from medtl.workspace import Workspace
from tests.hostile_corpus import _save, image_dataset

MiB = 1024 * 1024


def _image(path: Path, seed: int, institution: str = "") -> Path:
    """A tiny valid image with its own SOP Instance UID (the corpus template's is fixed)."""
    ds = image_dataset()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"accounting {seed}"])
    if institution:
        ds.InstitutionName = institution
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(ds, path)
    return path


def _config(folder: Path, **overrides: object) -> IngestConfig:
    return IngestConfig(input_dir=folder, image_size=16, workers=1, **overrides)


def _outcomes(ws: Workspace) -> dict[str, tuple[str, str]]:
    ledger = load_ledger(ws)
    return {path: (status, reason) for path, status, reason in zip(ledger["path"], ledger["status"], ledger["reason"])}


def _balances(summary: IngestSummary) -> bool:
    return summary.files_in == (summary.ingested + summary.quarantined + summary.duplicates + summary.skipped
                                + summary.to_retry)


# ---------------------------------------------------------------------------------------------- class 4


def test_hospital_falls_back_to_the_folder_name_through_the_aliases_or_a_pseudonym(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "St_Elsewhere_General" / "a.dcm", 1)  # no InstitutionName: the folder names the site
    _image(inputs / "Mercy_West_Hospital" / "b.dcm", 2)
    _image(inputs / "Mercy_West_Hospital" / "c.dcm", 3, institution="Seattle Grace")
    ws = Workspace(tmp_path / "work")

    cfg = _config(inputs, deid=DeidConfig(site_aliases={"St_Elsewhere_General": "site_a"}))
    ingest_folder(cfg, ws)

    hospitals = sorted(read_manifest(ws)["hospital"])
    assert "site_a" in hospitals
    assert not {"Mercy_West_Hospital", "Seattle Grace", "St_Elsewhere_General"} & set(hospitals)
    assert all(h == "site_a" or (h.startswith("site-") and len(h) == 15) for h in hospitals)
    assert len(set(hospitals)) == 3  # the folder and the attribute stay two sites, each under its pseudonym


# ---------------------------------------------------------------------------------------------- class 5


def test_symbolic_link_loops_are_skipped_with_a_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    (inputs / "self").symlink_to("self")
    (inputs / "ping").symlink_to("pong")
    (inputs / "pong").symlink_to("ping")
    (inputs / "sub").mkdir()
    (inputs / "sub" / "up").symlink_to("..")  # a folder link back up: walking it would never end
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    outcomes = _outcomes(ws)
    assert (summary.files_in, summary.ingested, summary.skipped) == (5, 1, 4) and _balances(summary)
    for name in ("self", "ping", "pong"):
        assert outcomes[name] == ("skipped", "symbolic link loop: not followed")
    assert outcomes["sub/up"][0] == "skipped" and "folder inside the input folder" in outcomes["sub/up"][1]
    again = ingest_folder(_config(inputs), ws)
    assert again.skipped_already_done == again.files_in == 5 and _balances(again)


def _unreadable_is_skipped_then_ingested_once_readable(inputs: Path, ws: Workspace) -> None:
    summary = ingest_folder(_config(inputs), ws)

    status, reason = _outcomes(ws)["locked.dcm"]
    assert status == "skipped" and reason.startswith("unreadable: permission denied")
    assert (summary.files_in, summary.ingested, summary.skipped) == (2, 1, 1) and _balances(summary)
    assert ws.manifest.is_file()


def test_a_file_the_account_cannot_read_is_skipped_with_a_reason(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file whatever its mode; the monkeypatched variant covers this")
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    locked = _image(inputs / "locked.dcm", 2)
    locked.chmod(0)
    ws = Workspace(tmp_path / "work")
    try:
        _unreadable_is_skipped_then_ingested_once_readable(inputs, ws)
    finally:
        locked.chmod(0o644)
    again = ingest_folder(_config(inputs), ws)
    assert _outcomes(ws)["locked.dcm"][0] == "ingested" and again.ingested == 2


def test_a_file_that_cannot_be_opened_while_hashing_is_skipped_with_a_reason(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    _image(inputs / "locked.dcm", 2)
    ws = Workspace(tmp_path / "work")
    real_hash = folder_module.file_sha256

    def denied(path: Path) -> str:
        if path.name == "locked.dcm":
            raise PermissionError(13, "Permission denied", str(path))
        return real_hash(path)

    monkeypatch.setattr(folder_module, "file_sha256", denied)
    _unreadable_is_skipped_then_ingested_once_readable(inputs, ws)
    monkeypatch.undo()  # read access granted: the next run ingests it
    again = ingest_folder(_config(inputs), ws)
    assert _outcomes(ws)["locked.dcm"][0] == "ingested" and again.ingested == 2 and _balances(again)


def test_a_folder_that_cannot_be_listed_is_skipped_with_a_reason(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "input"
    _image(inputs / "good.dcm", 1)
    _image(inputs / "locked" / "hidden.dcm", 2)
    real_scandir = os.scandir

    def denied(path: os.PathLike | int = ".") -> object:  # a folder without read permission (root lists any)
        if not isinstance(path, int) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder_module.os, "scandir", denied)
    ws = Workspace(tmp_path / "work")
    summary = ingest_folder(_config(inputs), ws)
    monkeypatch.undo()

    status, reason = _outcomes(ws)["locked"]
    assert status == "skipped" and reason.startswith("folder cannot be listed: permission denied")
    assert (summary.files_in, summary.ingested, summary.skipped) == (2, 1, 1) and _balances(summary)


def test_a_name_that_is_not_utf8_is_recorded_escaped_and_the_tables_are_written(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    raw = os.fsencode(inputs)
    _image(Path(os.fsdecode(raw + b"/\xff\xfe.dcm")), 1)
    Path(os.fsdecode(raw + b"/\xe9t\xe9.dcm")).write_bytes(b"latin-1 named, not DICOM")  # to quarantine
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    outcomes = _outcomes(ws)
    assert outcomes["\\xff\\xfe.dcm"][0] == "ingested"
    assert outcomes["\\xe9t\\xe9.dcm"][0] == "quarantined"
    assert (summary.files_in, summary.ingested, summary.quarantined) == (2, 1, 1) and _balances(summary)
    assert ws.manifest.is_file() and len(read_manifest(ws)) == 1
    assert [p.name.split("_", 1)[1] for p in ws.quarantine.iterdir()] == ["\\xe9t\\xe9.dcm"]
    again = ingest_folder(_config(inputs), ws)
    assert again.skipped_already_done == 2


def test_a_255_byte_name_is_quarantined_under_a_shorter_name(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    name = "n" * 251 + ".dcm"  # the longest name most file systems allow
    (inputs / name).write_bytes(b"not DICOM")
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    assert _outcomes(ws)[name][0] == "quarantined" and summary.quarantined == 1
    (copy,) = ws.quarantine.iterdir()
    assert copy.name.endswith("nnn.dcm") and len(copy.name.encode()) < 255 - len(".tmp.")
    assert copy.read_bytes() == b"not DICOM"


# ---------------------------------------------------------------------------------------------- class 6

_HELD: list[bytearray] = []


def _exhaust_memory() -> None:
    """Like a decoder that runs out of memory and keeps what it allocated: take all the worker may map."""
    try:
        while True:
            _HELD.append(bytearray(16 * MiB))
    except MemoryError:
        raise MemoryError("Unable to allocate output buffer (JPEG-LS declaring 65535 x 65535)") from None


def _poisoning_ingest(job: FileJob, settings: WorkerSettings) -> FileResult:
    """``ingest_file``, except that the hostile file exhausts the worker's memory and every file first needs
    32 MiB for a moment: after the hostile one, the same worker fails them all."""
    if "hostile" in job.relpath:
        _exhaust_memory()
    bytearray(32 * MiB)
    return ingest_file(job, settings)


@pytest.mark.timeout(120)
def test_a_worker_that_ran_out_of_memory_is_replaced_and_the_file_is_retried_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "input"
    for i, name in enumerate(["a_hostile.dcm", "b.dcm", "c.dcm", "d.dcm"]):
        _image(inputs / name, i)
    ws = Workspace(tmp_path / "work")
    cfg = _config(inputs, worker_memory_mb=512, max_decoded_mib=64)
    monkeypatch.setattr(folder_module, "ingest_file", _poisoning_ingest)

    summary = ingest_folder(cfg, ws)

    outcomes = _outcomes(ws)
    assert outcomes["a_hostile.dcm"][0] == "retry" and "out of memory" in outcomes["a_hostile.dcm"][1]
    assert [outcomes[n][0] for n in ("b.dcm", "c.dcm", "d.dcm")] == ["ingested"] * 3
    assert (summary.ingested, summary.to_retry, summary.quarantined) == (3, 1, 0) and _balances(summary)
    assert "to retry 1" in str(summary) and not any(ws.quarantine.iterdir())

    again = ingest_folder(cfg, ws)  # the file is parsed again, not counted as done
    assert (again.skipped_already_done, again.to_retry) == (3, 1) and len(load_ledger(ws)) == 4
    monkeypatch.undo()  # the file alone fits: a retry in a fresh worker ingests it
    last = ingest_folder(cfg, ws)
    assert _outcomes(ws)["a_hostile.dcm"][0] == "ingested" and (last.ingested, last.to_retry) == (4, 0)


def test_a_memory_error_wrapped_by_a_decoder_still_reaches_the_sandbox(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def decoder_out_of_memory(path: Path, max_bytes: int) -> None:
        try:
            raise MemoryError("Unable to allocate output buffer")
        except MemoryError as exc:
            raise RuntimeError("JPEG-LS decoder failed") from exc

    monkeypatch.setattr("medtl.ingest.worker.read_dataset", decoder_out_of_memory)
    settings = folder_module.worker_settings(_config(tmp_path), tmp_path / "ingest")
    job = FileJob(_image(tmp_path / "a.dcm", 1), "a.dcm", "0" * 64)

    with pytest.raises(MemoryError, match="RuntimeError: JPEG-LS decoder failed"):
        ingest_file(job, settings)  # caught as a quarantine reason, it would leave its worker poisoned


def _poisoning_job(job: str) -> str:
    if job == "hostile":
        _exhaust_memory()
    bytearray(32 * MiB)
    return job.upper()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_sandbox_replaces_a_worker_after_a_memory_error(workers: int) -> None:
    jobs = ["a", "hostile", "b", "c", "d", "e"]
    results = list(sandboxed_map(_poisoning_job, jobs, workers=workers, memory_mb=512, timeout_s=30,
                                 on_failure=lambda job, reason: reason))

    assert results[0] == "A" and results[2:] == ["B", "C", "D", "E"]
    assert results[1].startswith("out of memory") and is_resource_failure(results[1])
    assert "JPEG-LS declaring 65535 x 65535" in results[1]  # what the worker knew of the allocation


# ---------------------------------------------------------------------------------------------- class 7


def test_a_sparse_file_is_quarantined_without_filling_its_holes(tmp_path: Path) -> None:
    inputs = tmp_path / "input"
    inputs.mkdir()
    sparse = inputs / "sparse.dcm"
    with open(sparse, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + bytes(8))  # a PNG signature: refused at once, zeros would be parsed
        fh.truncate(64 * MiB)
    if sparse.stat().st_blocks * 512 > MiB:
        pytest.skip("this file system does not keep holes")
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    assert summary.quarantined == 1
    (copy,) = ws.quarantine.iterdir()
    assert copy.stat().st_size == 64 * MiB and copy.stat().st_blocks * 512 <= MiB
    assert folder_module.file_sha256(copy) == load_ledger(ws).loc[0, "content_hash"]


# ---------------------------------------------------------------------------------------------- class 8


def _entries_of_every_kind(root: Path) -> Path:
    """An input folder with two images, a link to one of them, and five entries that are not read."""
    inputs = root / "input"
    _image(inputs / "site" / "a.dcm", 1)
    _image(inputs / "site" / "b.dcm", 2)
    for i in range(4):
        _image(root / "elsewhere" / f"{i}.dcm", 10 + i)
    (inputs / "linked_out").symlink_to(root / "elsewhere")  # 4 files outside: not followed
    (inputs / "linked_in").symlink_to("site")  # the same 2 files again: counted once, under site/
    (inputs / "alias.dcm").symlink_to("site/a.dcm")  # a file link inside is read: a duplicate
    (inputs / "gone.dcm").symlink_to("nowhere.dcm")
    os.mkfifo(inputs / "pipe")
    return inputs


EXPECTED = {
    "alias.dcm": ("ingested", ""),  # sorts before site/a.dcm, so it carries the image and site/a.dcm is the copy
    "gone.dcm": ("skipped", "broken symbolic link"),
    "linked_in": ("skipped", "symbolic link to a folder inside the input folder"),
    "linked_out": ("skipped", "symbolic link leaving the input folder"),
    "pipe": ("skipped", "not a regular file (FIFO)"),
    "site/a.dcm": ("duplicate", "same content as alias.dcm"),
    "site/b.dcm": ("ingested", ""),
}


def _check_every_entry_is_accounted_for(ws: Workspace, summary: IngestSummary) -> None:
    outcomes = _outcomes(ws)
    assert sorted(outcomes) == sorted(EXPECTED)
    for path, (status, reason) in EXPECTED.items():
        assert outcomes[path][0] == status and outcomes[path][1].startswith(reason), (path, outcomes[path])
    assert (summary.files_in, summary.ingested, summary.duplicates, summary.skipped) == (7, 2, 1, 4)
    assert _balances(summary)
    assert str(summary) == "files in 7 = ingested 2 + quarantined 0 + duplicates 1 + skipped 4 (already done 0)"


def test_every_entry_below_the_input_folder_is_accounted_for(tmp_path: Path) -> None:
    inputs = _entries_of_every_kind(tmp_path)
    ws = Workspace(tmp_path / "work")

    summary = ingest_folder(_config(inputs), ws)

    _check_every_entry_is_accounted_for(ws, summary)
    again = ingest_folder(_config(inputs), ws)
    assert again.skipped_already_done == again.files_in == 7 and _balances(again)


def test_sharded_ingestion_accounts_for_every_entry_the_same_way(tmp_path: Path) -> None:
    inputs = _entries_of_every_kind(tmp_path)
    ws = Workspace(tmp_path / "work")
    cfg = _config(inputs)

    planned = plan_shards(cfg, ws, 2)
    for shard in range(len(planned["shards"])):
        ingest_shard(cfg, ws, shard)
    summary = merge_shards(cfg, ws)

    assert planned["files_in"] == 7
    _check_every_entry_is_accounted_for(ws, summary)

