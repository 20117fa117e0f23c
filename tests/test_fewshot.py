"""Prototypical networks: maths, classifier, episode sampler, episodic training, evaluation protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.utils.data import DataLoader

from medtl import stages
from medtl.config import DataConfig, FewshotConfig, TrainConfig
from medtl.data.datasets import SampleDataset
from medtl.data.transforms import eval_transform
from medtl.fewshot import (EpisodeSampler, PrototypicalClassifier, PrototypicalLoss, evaluate_episodes,
                           prototype_logits, prototypes)
from medtl.train import fit
from medtl.train.inference import embeddings
from tests.conftest import TINY_SOURCE, TINY_TARGET, TinyNet, ingest_two_hospital_cohort, run_folder_sharing_ingest


def _clusters(rng: np.random.Generator, per_class: int, centers: np.ndarray, noise: float) -> tuple:
    labels = np.repeat(np.arange(len(centers)), per_class)
    return centers[labels] + rng.normal(0, noise, (labels.size, centers.shape[1])), labels


class _Flatten(nn.Module):
    """An identity "backbone": an episode's embeddings are its inputs, so the loss can be checked by hand."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# ---------------------------------------------------------------- pure maths


def test_prototypes_are_class_means():
    z = torch.tensor([[0.0, 0.0], [2.0, 4.0], [1.0, 1.0], [3.0, 3.0], [5.0, 7.0]])
    labels = torch.tensor([0, 0, 2, 2, 1])
    expected = torch.tensor([[1.0, 2.0], [5.0, 7.0], [2.0, 2.0]])
    torch.testing.assert_close(prototypes(z, labels, 3), expected)


def test_prototypes_reject_empty_and_out_of_range_classes():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"classes \[1\] have no support example"):
        prototypes(z, torch.tensor([0, 2]), 3)
    with pytest.raises(ValueError, match="must lie in"):
        prototypes(z, torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="expects"):
        prototypes(z, torch.tensor([0]), 1)


def test_prototype_logits_are_negative_squared_distances():
    queries = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    protos = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    expected = torch.tensor([[0.0, -16.0], [-25.0, -9.0]])
    torch.testing.assert_close(prototype_logits(queries, protos), expected)
    torch.testing.assert_close(prototype_logits(queries, protos, scale=0.5), expected / 2)


def test_prototype_logits_cosine_are_scaled_similarities():
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    logits = prototype_logits(torch.tensor([[5.0, 0.0]]), protos, metric="cosine")
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0, -10.0, 10 / 2**0.5]]))
    torch.testing.assert_close(prototype_logits(torch.tensor([[5.0, 0.0]]), protos, "cosine", scale=1.0),
                               logits / 10)
    with pytest.raises(ValueError, match="metric must be one of"):
        prototype_logits(torch.zeros(1, 2), protos, metric="manhattan")
    with pytest.raises(ValueError, match="equal D"):
        prototype_logits(torch.zeros(1, 3), protos)


# ---------------------------------------------------------------- classifier


def test_classifier_is_perfect_on_well_separated_clusters():
    rng = np.random.default_rng(0)
    centers = 10.0 * np.eye(3, 8)
    support, labels = _clusters(rng, 5, centers, noise=0.5)
    names = np.array(["effusion", "nodule", "normal"])
    clf = PrototypicalClassifier().fit(support, names[labels])
    queries, query_labels = _clusters(rng, 100, centers, noise=0.5)

    assert clf.classes_.tolist() == names.tolist()
    assert clf.prototypes_.shape == (3, 8) and clf.n_features_in_ == 8
    assert clf.score(queries, names[query_labels]) == 1.0
    proba = clf.predict_proba(queries)
    assert proba.shape == (300, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert clf.decision_function(queries).shape == (300, 3)
    cosine = clone(PrototypicalClassifier(metric="cosine")).fit(support, labels)
    assert cosine.score(queries, query_labels) == 1.0


def test_classifier_is_at_chance_on_identically_distributed_noise():
    rng = np.random.default_rng(1)
    support, labels = rng.normal(size=(15, 16)), np.repeat(np.arange(3), 5)
    clf = PrototypicalClassifier().fit(support, labels)
    queries, query_labels = rng.normal(size=(6000, 16)), rng.integers(0, 3, 6000)
    # The labels are independent of the queries, so accuracy is Binomial(6000, 1/3) / 6000: sd 0.006.
    assert abs(clf.score(queries, query_labels) - 1 / 3) < 0.03


def test_binary_decision_function_is_the_margin_of_the_second_class():
    support, labels = np.array([[0.0], [1.0], [4.0], [5.0]]), np.array([0, 0, 1, 1])
    clf = PrototypicalClassifier().fit(support, labels)  # prototypes 0.5 and 4.5
    margin = clf.decision_function(np.array([[0.5], [4.5], [2.5]]))
    np.testing.assert_allclose(margin, [-16.0, 16.0, 0.0])
    assert clf.predict(np.array([[0.5], [4.5]])).tolist() == [0, 1]


@parametrize_with_checks([PrototypicalClassifier(), PrototypicalClassifier(metric="cosine")])
def test_classifier_follows_scikit_learn_conventions(estimator, check):
    check(estimator)


def test_classifier_errors_say_what_to_fix():
    with pytest.raises(NotFittedError):
        PrototypicalClassifier().predict(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        PrototypicalClassifier().fit(np.zeros((3, 2)), np.zeros(3))
    clf = PrototypicalClassifier().fit(np.eye(2), [0, 1])
    with pytest.raises(ValueError, match="backbone used in fit"):
        clf.predict(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(np.array([[np.nan, 0.0]]))


# ---------------------------------------------------------------- sampler

LABELS = np.array([0] * 6 + [1] * 7 + [2] * 5 + [3] * 8 + [-1] * 4)


def test_sampler_yields_n_way_k_shot_episodes_support_first():
    n_way, k_shot, n_query = 3, 2, 3
    sampler = EpisodeSampler(LABELS, n_way, k_shot, n_query, episodes_per_epoch=20, seed=0)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 20
    for episode in episodes:
        assert len(episode) == len(set(episode)) == n_way * (k_shot + n_query)
        support = LABELS[episode[:n_way * k_shot]].reshape(n_way, k_shot)
        queries = LABELS[episode[n_way * k_shot:]].reshape(n_way, n_query)
        classes = support[:, 0]
        assert len(set(classes)) == n_way and (classes >= 0).all()  # unlabeled items are never drawn
        assert (support == classes[:, None]).all() and (queries == classes[:, None]).all()
    assert len({tuple(LABELS[e[:n_way * k_shot:k_shot]]) for e in episodes}) > 5  # class choice and order vary


def test_sampler_is_deterministic_per_epoch_and_differs_across_epochs():
    def epoch_of(seed, epoch):
        sampler = EpisodeSampler(LABELS, 2, 1, 2, episodes_per_epoch=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_of(0, 3) == epoch_of(0, 3)
    assert epoch_of(0, 3) != epoch_of(0, 4)
    assert epoch_of(0, 1) != epoch_of(1, 0)
    sampler = EpisodeSampler(LABELS, 2, 1, 2, episodes_per_epoch=10, seed=0)
    first = list(sampler)
    assert list(sampler) == first  # without set_epoch, the same epoch again


def test_sampler_rejects_classes_too_small_for_an_episode():
    with pytest.raises(ValueError, match=r"k_shot \+ n_query = 3 \+ 3 = 6 .* class 2 has 5; lower k_shot or n_query"):
        EpisodeSampler(LABELS, 3, 3, 3)
    with pytest.raises(ValueError, match="needs n_way=5 classes but the labels hold 4"):
        EpisodeSampler(LABELS, 5, 1, 1)
    with pytest.raises(ValueError, match="k_shot must be >= 1"):
        EpisodeSampler(LABELS, 2, 0, 1)
    with pytest.raises(ValueError, match="integer classes"):
        EpisodeSampler(["a", "b"], 2, 1, 1)


def test_dataloader_with_the_sampler_yields_one_episode_per_batch():
    data = [{"image": torch.full((1, 4, 4), float(i)), "label": int(y)} for i, y in enumerate(LABELS)]
    sampler = EpisodeSampler(LABELS, 2, 3, 2, episodes_per_epoch=4)
    batches = list(DataLoader(data, batch_sampler=sampler))
    assert len(batches) == 4
    for batch, episode in zip(batches, sampler):
        assert batch["image"].shape == (10, 1, 4, 4)
        assert batch["image"][:, 0, 0, 0].long().tolist() == episode
        assert batch["label"].tolist() == LABELS[episode].tolist()


# ---------------------------------------------------------------- episodic objective


def test_prototypical_loss_matches_a_hand_computed_episode():
    # 2-way 2-shot 1-query; the "images" are 2-D points and the model is the identity.
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 6.0]])  # prototypes (1, 0) and (0, 5)
    queries = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    batch = {"image": torch.cat([support, queries]), "label": torch.tensor([7, 7, 3, 3, 7, 3])}
    loss, logs = PrototypicalLoss(n_way=2, k_shot=2, n_query=1)(_Flatten(), batch)
    # squared distances: query 1 → 1 and 17; query 2 → 10 and 4
    expected = F.cross_entropy(torch.tensor([[-1.0, -17.0], [-10.0, -4.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(loss, expected)
    assert logs == {"loss": pytest.approx(expected.item()), "acc": 1.0}


def test_prototypical_loss_rejects_batches_that_are_not_episodes():
    objective = PrototypicalLoss(n_way=2, k_shot=1, n_query=1)
    points = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="the batch has 5"):
        objective(_Flatten(), {"image": torch.zeros(5, 2), "label": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(ValueError, match="not an episode in EpisodeSampler order"):
        objective(_Flatten(), {"image": points, "label": torch.tensor([0, 1, 1, 0])})
    with pytest.raises(ValueError, match="not an episode in EpisodeSampler order"):
        objective(_Flatten(), {"image": points, "label": torch.tensor([0, 0, 0, 0])})
    with pytest.raises(ValueError, match="n_way must be >= 2"):
        PrototypicalLoss(n_way=1, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="metric"):
        PrototypicalLoss(n_way=2, k_shot=1, n_query=1, metric="l1")


def _three_class_images(folder: Path, per_class: int = 20, size: int = 16) -> list[dict]:
    """Horizontal bar / vertical bar / square at random places, under a random brightness offset that
    dominates a random network's pooled features, so an untrained embedding is near chance."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(3 * per_class):
        label = i % 3
        image = rng.normal(0.5, 0.05, (1, size, size)) + rng.uniform(-0.25, 0.25)
        row, col = rng.integers(1, size - 5, 2)
        if label == 0:
            image[:, row:row + 2, 1:-1] += 0.3
        elif label == 1:
            image[:, 1:-1, col:col + 2] += 0.3
        else:
            image[:, row:row + 5, col:col + 5] += 0.3
        path = folder / f"img{i:03d}.npy"
        np.save(path, np.clip(image, 0, 1).astype(np.float32))
        records.append({"image": str(path), "label": label, "hospital": "h1", "patient_id": f"p{i}"})
    return records


def test_episodic_fit_learns_a_few_shot_embedding(tmp_path):
    records = _three_class_images(tmp_path)
    labels = np.array([r["label"] for r in records])
    dataset = SampleDataset(records, eval_transform(2, 16, (0.5,), (0.25,)))
    whole = DataLoader(dataset, batch_size=len(records))
    torch.manual_seed(0)
    model = TinyNet(width=16)

    def few_shot_accuracy() -> float:
        return evaluate_episodes(embeddings(model, whole, "cpu"), labels, 3, 2, 3, episodes=200)["accuracy"]

    before = few_shot_accuracy()
    sampler = EpisodeSampler(labels, n_way=3, k_shot=2, n_query=3, episodes_per_epoch=10)
    cfg = TrainConfig(epochs=4, lr=1e-2, device="cpu", progress=False, seed=0)
    result = fit(model, PrototypicalLoss(n_way=3, k_shot=2, n_query=3), DataLoader(dataset, batch_sampler=sampler),
                 cfg)
    after = few_shot_accuracy()

    assert before < 0.45  # chance is 1/3
    assert result.history[-1]["acc"] > max(0.85, result.history[0]["acc"])
    assert after > 0.85


# ---------------------------------------------------------------- evaluation protocol


def test_evaluate_episodes_reports_mean_and_95_percent_interval():
    rng = np.random.default_rng(0)
    noise, labels = rng.normal(size=(200, 8)), np.repeat(np.arange(4), 50)
    short = evaluate_episodes(noise, labels, n_way=4, k_shot=1, n_query=5, episodes=100, seed=0)
    long = evaluate_episodes(noise, labels, n_way=4, k_shot=1, n_query=5, episodes=1600, seed=0)

    assert set(short) == {"accuracy", "ci95", "ci_low", "ci_high", "episodes"} and short["episodes"] == 100
    assert short["ci_low"] == pytest.approx(short["accuracy"] - short["ci95"])
    assert short["ci_high"] == pytest.approx(short["accuracy"] + short["ci95"])
    assert long["ci_low"] < 0.25 < long["ci_high"]  # noise embeddings: at chance
    assert long["ci95"] == pytest.approx(short["ci95"] / 4, rel=0.3)  # the half-width shrinks as 1/sqrt(episodes)
    assert evaluate_episodes(noise, labels, 4, 1, 5, episodes=100, seed=0) == short

    clustered, cluster_labels = _clusters(rng, 20, 10.0 * np.eye(4), noise=0.5)
    perfect = evaluate_episodes(clustered, cluster_labels, n_way=3, k_shot=1, n_query=5, episodes=50)
    assert perfect["accuracy"] == 1.0 and perfect["ci95"] == 0.0
    with pytest.raises(ValueError, match="episodes must be >= 2"):
        evaluate_episodes(noise, labels, 4, 1, 5, episodes=1)


def test_prototypical_loss_keeps_the_distances_in_fp32_under_autocast():
    # fit() wraps objectives in bf16 autocast on GPU; the expanded squared distance must not run in bf16.
    torch.manual_seed(0)
    episode = {"image": torch.randn(20, 1280).abs() * 2, "label": torch.arange(5).repeat_interleave(2).repeat(2)}
    objective = PrototypicalLoss(n_way=5, k_shot=2, n_query=2)
    reference, _ = objective(_Flatten(), episode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = objective(_Flatten(), episode)
    assert torch.equal(under_autocast, reference)


def test_fit_reseeds_the_episode_sampler_every_epoch():
    from torch.utils.data import DataLoader

    from medtl.train.core import _set_epoch

    sampler = EpisodeSampler(np.repeat(np.arange(3), 10), n_way=2, k_shot=2, n_query=2, episodes_per_epoch=3)
    loader = DataLoader(list(range(30)), batch_sampler=sampler)
    first = [list(b) for b in loader]
    _set_epoch(loader, 3)
    assert sampler.epoch == 3 and [list(b) for b in loader] != first


# ---------------------------------------------------------------- the fewshot stage


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    yield from ingest_two_hospital_cohort(tmp_path_factory)


def test_fewshot_stage_evaluates_each_hospital_on_images_training_never_saw(cohort, tmp_path):
    ws = run_folder_sharing_ingest(cohort, tmp_path / "run")
    data = DataConfig(source_hospitals=[TINY_SOURCE], target_hospital=TINY_TARGET, image_size=16)
    cfg = FewshotConfig(backbone="efficientnet_lite0.imagenet", k_shots=[2, 1, 12], n_query=3, episodes=20)
    summary = stages.run_fewshot(cfg, data, ws)
    assert json.loads((ws.fewshot / "summary.json").read_text()) == summary
    manifest = stages.load_split_manifest(ws, data)
    labeled = manifest[manifest["label"].notna()]
    unseen = {(TINY_SOURCE, "source"): labeled[(labeled["hospital"] == TINY_SOURCE) & (labeled["split"] == "test")],
              (TINY_TARGET, "target"): labeled[labeled["hospital"] == TINY_TARGET]}
    assert [(r["hospital"], r["role"], r["k_shot"]) for r in summary["results"]] == [
        (h, role, k) for h, role in sorted(unseen) for k in (1, 2, 12)]
    for r in summary["results"]:
        rows = unseen[(r["hospital"], r["role"])]
        assert r["images"] == len(rows) and sum(r["class_counts"].values()) == len(rows)
        if min(r["class_counts"].values()) >= r["k_shot"] + 3:
            assert 0 <= r["accuracy"] <= 1 and r["ci_low"] <= r["accuracy"] <= r["ci_high"] and r["episodes"] == 20
        else:
            assert "accuracy" not in r and "lower n_query or K" in r["skipped"]
    assert any("accuracy" in r for r in summary["results"]) and any("skipped" in r for r in summary["results"])
    assert summary["episodic_training"] is None

    episodic = TrainConfig(epochs=1, lr=1e-3, device="cpu", progress=False)
    with pytest.raises(ValueError, match="with K = 12, the largest of fewshot.k_shots: every class needs"):
        stages.run_fewshot(cfg.model_copy(update={"train": episodic}), data, ws)  # 18 training images
    trained = stages.run_fewshot(cfg.model_copy(update={"train": episodic, "k_shots": [1, 2]}), data, ws)
    training = trained["episodic_training"]
    assert training["k_shot"] == 2 and training["epochs"] == len(training["history"]) == 1
    saved = ws.weights / "efficientnet_lite0.protonet.safetensors"
    assert saved.exists() and training["weights"] == str(saved)
    before = {(r["hospital"], r["k_shot"]): r.get("accuracy") for r in summary["results"]}
    after = {(r["hospital"], r["k_shot"]): r.get("accuracy") for r in trained["results"]}
    assert after.keys() <= before.keys() and after != {key: before[key] for key in after}  # other embeddings


def test_fewshot_config_sorts_k_and_refuses_a_k_twice():
    assert FewshotConfig(k_shots=[10, 1, 5]).k_shots == [1, 5, 10]
    with pytest.raises(ValueError, match="lists a K twice"):
        FewshotConfig(k_shots=[5, 5])
