"""Ingestion: a DICOM folder → validated, de-identified ``float32`` arrays, a manifest and a ledger.

``ingest_folder`` is the stage entry point; ``load_manifest`` is how every later stage reads its
output and ``load_ledger`` is the per-file accounting (ingested / quarantined / duplicate).
"""

from medtl.ingest.folder import IngestSummary, ingest_folder
from medtl.ingest.manifest import load_ledger, load_manifest

__all__ = ["IngestSummary", "ingest_folder", "load_ledger", "load_manifest"]
