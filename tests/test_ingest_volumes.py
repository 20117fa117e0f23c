"""3D ingestion end to end on real scanner data: every series of dcm_qa_nih becomes the volume dcm2niix writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtl.config import IngestConfig
from medtl.ingest import ingest_folder, load_ledger, load_manifest
from medtl.ingest.manifest import read_manifest
from medtl.workspace import Workspace
from tests.conftest import SHARED

QA = SHARED / "data" / "dicom" / "dcm_qa_nih"


@pytest.mark.skipif(not QA.is_dir(), reason=f"{QA} not found (../shared is absent); nothing to compare against")
def test_every_series_is_ingested_as_dcm2niix_writes_it(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    inputs = [p for p in (QA / "In").rglob("*") if p.is_file()]

    summary = ingest_folder(IngestConfig(input_dir=QA / "In", spatial_dims=3, image_size=32, workers=2), ws)

    ledger, manifest = load_ledger(ws), load_manifest(ws)
    readmes = ledger[ledger["path"].str.contains("README")]
    assert summary.files_in == len(inputs) == len(ledger)
    assert summary.files_in == summary.ingested + summary.quarantined + summary.duplicates
    assert (readmes["status"] == "quarantined").all() and summary.quarantined == len(readmes)
    references = [nib.load(p) for p in sorted((QA / "Ref").glob("*.nii"))]
    assert len(manifest) == len(references) == 8
    for row in manifest.itertuples():
        ours = nib.load(ws.ingest / row.volume)
        matches = [ref for ref in references
                   if ref.shape == ours.shape and np.array_equal(ref.dataobj.get_unscaled(), ours.dataobj.get_unscaled())]
        assert len(matches) == 1, f"{row.volume}: no dcm2niix reference with the same voxels"
        np.testing.assert_allclose(ours.affine, matches[0].affine, atol=1e-3)
        assert Path(row.volume).stem == row.series_uid or Path(row.volume).stem.startswith(row.series_uid + "_")
        array = np.load(row.image)
        assert array.shape == (1, 32, 32, 32) and array.dtype == np.float32
        assert 0.0 <= array.min() and array.max() <= 1.0
    assert set(manifest["vendor"].str.upper().str[:2]) == {"GE", "SI"}
    assert (ledger.loc[ledger["status"] == "ingested", "image"].isin(set(read_manifest(ws)["image"]))).all()


@pytest.mark.skipif(not QA.is_dir(), reason=f"{QA} not found (../shared is absent); nothing to compare against")
def test_rerun_does_nothing_and_labels_reach_the_series_volume(tmp_path: Path) -> None:
    series = QA / "In" / "20180918GE" / "mr_0004"
    folder = tmp_path / "input"
    shutil.copytree(series, folder)
    slices = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))
    ws = Workspace(tmp_path / "work")
    cfg = IngestConfig(input_dir=folder, spatial_dims=3, image_size=16)
    first = ingest_folder(cfg, ws)
    assert len(load_manifest(ws)) == 1 and first.ingested == len(slices)

    (folder / "labels.csv").write_text("path,label\n" + "".join(f"{s},1\n" for s in slices))
    again = ingest_folder(cfg, ws)

    assert again.skipped_already_done == again.files_in == first.files_in
    assert load_manifest(ws)["label"].tolist() == [1]
