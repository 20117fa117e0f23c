"""Time medtl's series → NIfTI conversion against dcm2niix on the same DICOM folder, side by side.

Usage::

    .venv/bin/python benchmarks/series_to_nifti.py [INPUT_DIR] [--repeats N] [--dcm2niix PATH]

INPUT_DIR defaults to ``../shared/data/dicom/dcm_qa_nih/In`` (relative to the repository root). Each
repeat runs both converters once, alternating, into fresh temporary folders; the medians are reported.
medtl's time covers discovering the files, reading, grouping, assembling and writing every series
(``series_to_nifti``) in this process; dcm2niix's is the wall time of ``dcm2niix -o OUT -f %s_%d INPUT``
(which also writes JSON sidecars). The issue's target is a ratio within 3.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medtl.ingest.volume import series_to_nifti

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dcm_qa_nih" / "In"


def time_medtl(input_dir: Path, out_dir: Path) -> tuple[float, int]:
    """Seconds to convert ``input_dir`` with medtl, and the number of NIfTI files written."""
    start = time.perf_counter()
    files = sorted(p for p in input_dir.rglob("*") if p.is_file())
    outcomes = series_to_nifti(files, out_dir)
    return time.perf_counter() - start, sum(o.status == "written" for o in outcomes)


def time_ingest(input_dir: Path, out_dir: Path, workers: int) -> tuple[float, int]:
    """Seconds for the whole 3D ingestion stage (``spatial_dims: 3``), and the number of NIfTI files written.

    Ingestion does more than convert: it hashes, validates, de-identifies and writes de-identified DICOM
    copies and model-ready arrays too, in ``workers`` sandboxed processes.
    """
    import logging
    import os

    from medtl.config import IngestConfig
    from medtl.ingest import ingest_folder
    from medtl.workspace import Workspace

    os.environ.setdefault("MEDTL_UID_SECRET", "benchmark-secret")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    ingest_folder(IngestConfig(input_dir=input_dir, spatial_dims=3, image_size=64, workers=workers),
                  Workspace(out_dir))
    return time.perf_counter() - start, len(list((out_dir / "ingest" / "volumes").glob("*.nii")))


def time_dcm2niix(exe: str, input_dir: Path, out_dir: Path) -> tuple[float, int]:
    """Seconds to convert ``input_dir`` with dcm2niix, and the number of NIfTI files written."""
    start = time.perf_counter()
    subprocess.run([exe, "-o", str(out_dir), "-f", "%s_%d", str(input_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, len(list(out_dir.glob("*.nii")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", nargs="?", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dcm2niix", default=shutil.which("dcm2niix") or "/usr/bin/dcm2niix")
    args = parser.parse_args()
    if not args.input_dir.is_dir():
        parser.error(f"input folder {args.input_dir} does not exist; pass a DICOM folder")
    if not Path(args.dcm2niix).is_file():
        parser.error(f"dcm2niix not found at {args.dcm2niix}; pass --dcm2niix PATH")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    ours, theirs, ingests = [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c:
            seconds, n_ours = time_medtl(args.input_dir, Path(a))
            ours.append(seconds)
            seconds, n_theirs = time_dcm2niix(args.dcm2niix, args.input_dir, Path(b))
            theirs.append(seconds)
            seconds, n_ingest = time_ingest(args.input_dir, Path(c), workers=2)
            ingests.append(seconds)
    medtl_s, dcm2niix_s, ingest_s = statistics.median(ours), statistics.median(theirs), statistics.median(ingests)
    print(f"input: {args.input_dir} ({sum(1 for p in args.input_dir.rglob('*') if p.is_file())} files)")
    print(f"medtl    series_to_nifti: {medtl_s:.3f} s  ({n_ours} NIfTI; median of {args.repeats})")
    print(f"dcm2niix -f %s_%d:        {dcm2niix_s:.3f} s  ({n_theirs} NIfTI; median of {args.repeats})")
    print(f"medtl ingest, 3D, 2 workers (+ de-identification, DICOM copies, arrays): {ingest_s:.3f} s  "
          f"({n_ingest} NIfTI)")
    print(f"ratio medtl series_to_nifti / dcm2niix:  {medtl_s / dcm2niix_s:.2f}  (target <= 3)")
    print(f"ratio medtl 3D ingest / dcm2niix:        {ingest_s / dcm2niix_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
