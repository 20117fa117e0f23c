import numpy as np
import pandas as pd
import pytest
import torch

from medtl.config import AugmentConfig
from medtl.data.datasets import PairedLoader, SampleDataset, assign_splits, make_loader, to_records
from medtl.data.transforms import eval_transform, ssl_views_transform, train_transform


def _manifest(n_patients=60):
    return pd.DataFrame({
        "patient_id": [f"p{i // 2}" for i in range(2 * n_patients)],
        "label": pd.array([i % 2 if i < n_patients else None for i in range(2 * n_patients)], dtype="Int64"),
    })


def test_splits_are_patient_level_stable_and_leave_unlabeled_alone():
    m = assign_splits(_manifest(), val_fraction=0.2, test_fraction=0.3, seed=0)
    assert set(m.loc[m["label"].isna(), "split"]) == {"unlabeled"}
    labeled = m[m["label"].notna()]
    assert labeled.groupby("patient_id")["split"].nunique().max() == 1
    assert {"train", "val", "test"} <= set(labeled["split"])
    again = assign_splits(_manifest(), 0.2, 0.3, seed=0)
    assert (again["split"] == m["split"]).all()
    # adding patients does not move the existing ones
    bigger = assign_splits(pd.concat([_manifest(), _manifest(80).iloc[120:]]), 0.2, 0.3, seed=0)
    assert (bigger["split"].iloc[:120].to_numpy() == m["split"].to_numpy()).all()


def test_to_records_marks_unlabeled():
    m = _manifest(4).assign(image="x.npy", hospital="h")
    records = to_records(m)
    assert [r["label"] for r in records] == [0, 1, 0, 1, -1, -1, -1, -1]


def test_eval_and_train_transforms_give_plain_normalised_tensors(array_records):
    sample = eval_transform(2, 16, (0.4,), (0.2,))(dict(array_records[0]))
    assert type(sample["image"]) is torch.Tensor and sample["image"].shape == (1, 16, 16)
    assert abs(sample["image"].mean().item()) < 1.0
    aug = train_transform(2, 16, (0.4,), (0.2,), AugmentConfig())(dict(array_records[0]))
    assert aug["image"].shape == (1, 16, 16)


def test_ssl_views_differ_and_share_shape(array_records):
    t = ssl_views_transform(2, 16, (0.4,), (0.2,), AugmentConfig())
    t.set_random_state(0)
    s = t(dict(array_records[1]))
    assert "image" not in s
    assert s["view1"].shape == s["view2"].shape == (1, 16, 16)
    assert not torch.allclose(s["view1"], s["view2"])


def test_transforms_work_in_3d(tmp_path):
    path = tmp_path / "vol.npy"
    np.save(path, np.random.default_rng(0).random((1, 12, 14, 10), dtype=np.float32))
    record = {"image": str(path), "label": 0}
    assert eval_transform(3, 8, (0.5,), (0.25,))(dict(record))["image"].shape == (1, 8, 8, 8)
    views = ssl_views_transform(3, 8, (0.5,), (0.25,), AugmentConfig())(dict(record))
    assert views["view1"].shape == (1, 8, 8, 8)


def test_spatial_dims_checked():
    with pytest.raises(ValueError, match="spatial_dims"):
        eval_transform(4, 8, (0.5,), (0.25,))


def test_set_epoch_makes_augmentation_a_function_of_seed_and_epoch(array_records):
    t = train_transform(2, 16, (0.4,), (0.2,), AugmentConfig())
    ds = SampleDataset(array_records[:4], t)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        ds.set_epoch(3)
        draws.append(ds[0]["image"])
    torch.testing.assert_close(draws[0], draws[1])


def test_paired_loader_cycles_target(array_records):
    t = eval_transform(2, 8, (0.5,), (0.25,))
    source = make_loader(SampleDataset(array_records[:16], t), 4, shuffle=False)
    target = make_loader(SampleDataset(array_records[16:22], t), 4, shuffle=False)
    batches = list(PairedLoader(source, target))
    assert len(batches) == 4
    assert all(b["target"]["image"].shape[1:] == (1, 8, 8) for b in batches)


def test_a_datasets_own_split_is_kept_and_the_rest_hashed():
    m = _manifest().assign(split="")
    m.loc[:9, "split"] = "test"  # e.g. a public benchmark's official test split
    out = assign_splits(m, val_fraction=0.2, test_fraction=0.3, seed=0)
    assert (out["split"].iloc[:10] == "test").all()
    hashed = assign_splits(_manifest(), 0.2, 0.3, seed=0)
    assert (out["split"].iloc[10:].to_numpy() == hashed["split"].iloc[10:].to_numpy()).all()
    m.loc[0, "split"] = "holdout"
    with pytest.raises(ValueError, match="'split' has \\['holdout'\\]; use train, val, test or empty"):
        assign_splits(m, 0.2, 0.3)
