"""Ingestion: a DICOM folder → validated, de-identified ``float32`` arrays, a manifest and a ledger.

``ingest_folder`` is the stage entry point; ``load_manifest`` is how every later stage reads its
output and ``load_ledger`` is the per-file accounting (ingested / quarantined / duplicate).

The exports load on first use, so that a worker process importing :mod:`medtl.ingest.worker` does not pay
for the main process's modules (pandas, the configuration models).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"IngestSummary": "medtl.ingest.folder", "ingest_folder": "medtl.ingest.folder",
            "load_ledger": "medtl.ingest.manifest", "load_manifest": "medtl.ingest.manifest"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medtl.ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
