"""Where each stage reads and writes inside a run's ``workdir``.

Stages communicate only through these files, so any stage can be re-run (or run from the CLI,
a notebook or a Prefect task) given the same workdir.
"""

from __future__ import annotations

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
    def adapt(self) -> Path:
        return self.root / "adapt"

    @property
    def evaluate(self) -> Path:
        """Per-site metrics of the fine-tuned model, one JSON per hospital (the Prefect evaluate flow's fan-out)."""
        return self.root / "evaluate"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def weights(self) -> Path:
        """Local weight store searched for ``arch.tag`` checkpoints (e.g. ``efficientnet_lite0.ssl``)."""
        return self.root / "weights"
