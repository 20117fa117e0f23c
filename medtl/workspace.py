"""Where each stage reads and writes inside a run's ``workdir``.

Stages communicate only through these files, so any stage can be re-run (or run from the CLI,
a notebook or a Prefect task) given the same workdir. Every file is written with :func:`atomic_write`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def dicom(self) -> Path:
        """The synthetic cohort's raw DICOM (input of ingestion by default)."""
        return self.root / "dicom"

    @property
    def pacs_incoming(self) -> Path:
        """Instances pulled from a PACS (``ingest.pacs``), one ``<SOPInstanceUID>.dcm`` each: ingestion's input.
        They are not yet de-identified."""
        return self.root / "pacs_incoming"

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    @property
    def manifest(self) -> Path:
        return self.ingest / "manifest.parquet"

    @property
    def quarantine(self) -> Path:
        return self.ingest / "quarantine"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def select(self) -> Path:
        return self.root / "select"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def loho(self) -> Path:
        """Leave-one-hospital-out evaluation of multi-source training."""
        return self.root / "loho"

    @property
    def fewshot(self) -> Path:
        """Few-shot (prototypical) evaluation of a backbone's embeddings."""
        return self.root / "fewshot"

    @property
    def adapt(self) -> Path:
        return self.root / "adapt"

    @property
    def deploy(self) -> Path:
        """The deployed model (``model.safetensors`` + card), its predictions and its label-free analyses."""
        return self.root / "deploy"

    @property
    def evaluate(self) -> Path:
        """Per-site metrics of the deployed model, one JSON per hospital (the Prefect evaluate flow's fan-out)."""
        return self.root / "evaluate"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def weights(self) -> Path:
        """Local weight store searched for ``arch.tag`` checkpoints (e.g. ``efficientnet_lite0.ssl``)."""
        return self.root / "weights"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` via ``write(tmp)`` on a hidden temporary sibling, then rename it into place, durably.

    A crash or a power cut mid-write leaves the old file (or none), never a truncated one that a later run would
    load: the bytes are fsynced before the rename, and the folder after it.

    Args:
        path: destination file; its folder is created.
        write: called with the temporary path (``.<name>.<pid>.<random>.tmp``); must write the complete file there.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # same filesystem: atomic rename
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on some systems (Windows); the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsynced on some filesystems
        pass
    finally:
        os.close(fd)
