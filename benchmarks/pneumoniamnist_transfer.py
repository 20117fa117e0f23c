"""Transfer learning on real chest radiographs: scratch vs ImageNet vs in-domain SSL, and backbone selection.

Data: ``../shared/data/pneumoniamnist_28.npz`` (MedMNIST v2 PneumoniaMNIST, official splits: train 4708,
val 524, test 624), upsampled bilinearly to ``--size`` pixels for the backbone (EfficientNet-Lite0, 3.4 M
parameters with a 2-class head, grey input).

Everything runs through medtl's own parts: the shared MONAI transforms, ``create_backbone``, the one
training loop ``fit`` with its ``Supervised`` and self-supervised objectives, the k-NN monitor, the
transferability scores and the selector. Steps:

1. **In-domain SSL**: SimCLR (``--ssl-method``) on the training images *without their labels*, starting
   from ImageNet (continued pretraining), with the k-NN monitor on the labeled validation images; the
   backbone is exported as ``efficientnet_lite0.ssl`` with its JSON card, and the backbone at each earlier
   k-NN check as ``efficientnet_lite0.ssl_ep<N>`` (``--inits ssl_ep4 ...`` makes them candidates too).
2. **SSL step throughput**: medtl's ``fit`` step vs lightly's own plain example loop (two forward passes,
   ``loss.backward()``, ``optimizer.step()``) on the same model, batch and optimizer, in interleaved rounds.
3. **Fine-tuning**: label fractions (stratified, nested per seed) x initialisations x seeds. Every run has the
   same step budget per fraction; the checkpoint with the best *validation* AUC is kept, and only that
   model is evaluated once on the official test split (AUC and ACC at the 0.5 threshold as MedMNIST reports,
   with percentile bootstrap 95 % CIs).
4. **Selection**: transferability scores of each initialisation's frozen features on the labeled training
   subset, against the fine-tuned validation AUC (weighted Kendall tau per score, score time vs fine-tuning time).

Runs are resumable: each finished run is a JSON file under ``--out``, skipped when present.

Run: ``.venv/bin/python benchmarks/pneumoniamnist_transfer.py`` (about 1.5 h on 2 CPU cores);
``--quick`` for a few-minute smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pneumoniamnist_28.npz"
ARCH = "efficientnet_lite0"
INITS = {"scratch": f"{ARCH}.scratch", "imagenet": f"{ARCH}.imagenet", "ssl": f"{ARCH}.ssl"}
SSL_SNAPSHOT = re.compile(r"ssl_ep\d+")  # the SSL backbone after N epochs, exported at each k-NN check
# MedMNIST v2, Table 4, PneumoniaMNIST test split (../shared/data/ATTRIBUTION.md)
PUBLISHED = {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864), "ResNet-50 (28)": (0.948, 0.854),
             "ResNet-50 (224)": (0.962, 0.884), "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
             "Google AutoML Vision": (0.991, 0.946)}

log = logging.getLogger("benchmark")


def backbone_name(init: str) -> str:
    return INITS.get(init, f"{ARCH}.{init}")


def init_name(value: str) -> str:
    if value not in INITS and not SSL_SNAPSHOT.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(INITS)} or ssl_ep<N> (an SSL snapshot "
                                         "written at a k-NN check of the pretraining run)")
    return value


def prepare(npz: Path, out: Path, size: int) -> dict[str, list[dict]]:
    """Write every image as a ``(1, size, size)`` float32 ``.npy`` in [0, 1]; return records per split."""
    data = np.load(npz)
    records: dict[str, list[dict]] = {}
    for split in ("train", "val", "test"):
        images = torch.from_numpy(data[f"{split}_images"]).float().div(255).unsqueeze(1)
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        labels = data[f"{split}_labels"][:, 0].astype(int)
        folder = out / "arrays" / f"{size}px"
        folder.mkdir(parents=True, exist_ok=True)
        records[split] = []
        for i, (image, label) in enumerate(zip(images.numpy(), labels)):
            path = folder / f"{split}_{i:05d}.npy"
            if not path.exists():
                np.save(path, image.astype(np.float32))
            # MedMNIST has one image per patient: the image index stands in for the patient id
            records[split].append({"image": str(path), "label": int(label), "patient_id": f"{split}{i}"})
    return records


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-stratified fraction of the labeled training images (at least 2 per class)."""
    if fraction >= 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == cls), max(2, round(int((labels == cls).sum()) * fraction)),
                       replace=False) for cls in np.unique(labels)]
    return np.sort(np.concatenate(keep))


# ------------------------------------------------------------------------------------------- SSL


def pretrain_ssl(records: dict[str, list[dict]], out: Path, args: argparse.Namespace) -> dict:
    from medtl.config import AugmentConfig, TrainConfig
    from medtl.data.datasets import SampleDataset, make_loader
    from medtl.data.transforms import eval_transform, ssl_views_transform
    from medtl.models import create_backbone, save_backbone
    from medtl.ssl import KnnMonitor, build_ssl_objective
    from medtl.train import fit

    card_path = out / "weights" / f"{ARCH}.ssl.json"
    if card_path.exists():
        return json.loads(card_path.read_text())
    backbone = create_backbone(INITS["imagenet"], num_classes=0)
    mean, std = backbone.cfg.mean, backbone.cfg.std
    unlabeled = [{"image": r["image"], "label": -1} for r in records["train"]]  # labels withheld
    views = ssl_views_transform(2, args.size, mean, std, AugmentConfig(crop_min_scale=0.5))
    loader = make_loader(SampleDataset(unlabeled, views), args.ssl_batch, shuffle=True, drop_last=True)
    cfg = TrainConfig(epochs=args.ssl_epochs, batch_size=args.ssl_batch, lr=args.ssl_lr, warmup_epochs=1,
                      seed=0, progress=False)
    objective = build_ssl_objective(args.ssl_method, backbone, temperature=0.2, total_steps=cfg.epochs * len(loader))
    evaluation = eval_transform(2, args.size, mean, std)
    monitor = KnnMonitor(make_loader(SampleDataset(records["train"][:2000], evaluation), 256, shuffle=False),
                         make_loader(SampleDataset(records["val"], evaluation), 256, shuffle=False),
                         every=max(1, args.ssl_epochs // 5), epochs=args.ssl_epochs)
    imagenet_knn = {}
    monitor_before = KnnMonitor(monitor.train_loader, monitor.val_loader)
    monitor_before(-1, backbone, imagenet_knn)
    provenance = {"method": args.ssl_method, "init": INITS["imagenet"], "n_images": len(unlabeled),
                  "data": "pneumoniamnist_28.npz train split, labels withheld", "size": args.size}

    def snapshot(epoch: int, model: torch.nn.Module, logs: dict) -> None:
        # every monitored epoch before the last becomes a candidate of its own (``ssl_ep<N>``): a wider pool for
        # the selection check than three initialisations
        if "knn_acc" in logs and epoch + 1 < cfg.epochs:
            save_backbone(model, out / "weights" / f"{ARCH}.ssl_ep{epoch + 1}",
                          {**provenance, "epochs": epoch + 1, "knn_acc": logs["knn_acc"]})

    result = fit(backbone, objective, loader, cfg, checkpoint_dir=out / "ssl_checkpoints",
                 callbacks=[monitor, snapshot],
                 fingerprint_extra={"method": args.ssl_method, "size": args.size}, description="ssl")
    card = {**provenance, "epochs": cfg.epochs, "config": cfg.model_dump(mode="json"), "knn_before": imagenet_knn.get("knn_acc"),
            "knn_curve": [{"epoch": h["epoch"], "knn_acc": h["knn_acc"]} for h in result.history if "knn_acc" in h],
            "history": result.history, "seconds": result.seconds}
    save_backbone(backbone, out / "weights" / f"{ARCH}.ssl", card)
    return card


def ssl_throughput(args: argparse.Namespace, rounds: int = 5, steps: int = 8) -> dict:
    """Images/s of SSL steps: medtl's ``fit`` vs lightly's plain example loop, same model, batch and optimizer.

    Both time their steps only: lightly's loop from its first batch, ``fit`` from the moment it takes its first
    batch (its set-up, seeding and optimizer construction are outside the clock, as the loop's are).
    """
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from medtl.config import TrainConfig
    from medtl.models import create_backbone
    from medtl.ssl import SimCLR
    from medtl.train import fit
    from medtl.train.core import build_optimizer

    torch.manual_seed(0)
    batch = args.ssl_batch
    views = [(torch.randn(batch, 1, args.size, args.size), torch.randn(batch, 1, args.size, args.size))
             for _ in range(steps)]
    cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=0.06, grad_clip_norm=None,
                      deterministic=False, progress=False, device="cpu")

    class FirstBatchClock(list):
        """The batches, noting when ``fit`` takes the first one."""

        def __iter__(self):  # noqa: ANN204
            self.started = time.perf_counter()
            return super().__iter__()

    def medtl_run() -> float:
        backbone = create_backbone(INITS["imagenet"], num_classes=0)
        loader = FirstBatchClock({"view1": a, "view2": b} for a, b in views)
        fit(backbone, SimCLR(backbone.num_features), loader, cfg)
        return steps * batch / (time.perf_counter() - loader.started)

    def lightly_run() -> float:
        # lightly's SimCLR example loop (backbone + projection head, NT-Xent), with the optimizer fit builds
        backbone = create_backbone(INITS["imagenet"], num_classes=0)
        head = SimCLRProjectionHead(backbone.num_features, backbone.num_features, 128)
        model = torch.nn.Sequential(backbone, head)
        criterion = NTXentLoss(temperature=0.2)
        optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
        model.train()
        t0 = time.perf_counter()
        for x0, x1 in views:
            z0 = model(x0)
            z1 = model(x1)
            loss = criterion(z0, z1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return steps * batch / (time.perf_counter() - t0)

    medtl_ips, lightly_ips = [], []
    lightly_run(), medtl_run()  # warm-up, untimed: the first run in a process pays for allocator and kernel set-up
    for _ in range(rounds):
        lightly_ips.append(lightly_run())
        medtl_ips.append(medtl_run())
    ratios = [m / lt for m, lt in zip(medtl_ips, lightly_ips)]
    return {"medtl_images_per_s": statistics.median(medtl_ips), "lightly_images_per_s": statistics.median(lightly_ips),
            "ratio_median": statistics.median(ratios), "ratios": ratios, "batch": batch, "steps": steps}


# ------------------------------------------------------------------------------------------- fine-tuning


def linear_probe(frozen: dict, index: np.ndarray, y_train: np.ndarray, y_val: np.ndarray,
                 class_weight: str | None = None) -> dict:
    """The other recipe for a pretrained initialisation: logistic regression on its frozen features of the labeled
    subset ``index``, its inverse regularisation C chosen on validation AUC, as fine-tuning chooses its epoch;
    ``class_weight="balanced"`` weighs classes as ``--class-weight balanced`` fine-tuning does."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best: dict = {"val_auc": -1.0}
    for c in (0.01, 0.1, 1.0):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight=class_weight))
        probe.fit(frozen["train"][index], y_train)
        auc = float(roc_auc_score(y_val, probe.predict_proba(frozen["val"])[:, 1]))
        if auc > best["val_auc"]:
            best = {"val_auc": auc, "C": c, "probe": probe}
    return best


def finetune(init: str, train: list[dict], val: list[dict], test: list[dict], fraction: float, seed: int,
             out: Path, args: argparse.Namespace, probe: dict, val_features: np.ndarray,
             test_features: np.ndarray) -> dict:
    """Fine-tune ``init`` on ``train``; keep the checkpoint, or the linear ``probe``, with the best validation AUC,
    and evaluate only that one on the test split. The chosen model's validation and test probabilities are kept in
    the run's JSON, so analyses that need no training (the label-shift correction) are recomputed from them."""
    from sklearn.metrics import roc_auc_score

    from medtl.config import AugmentConfig, TrainConfig
    from medtl.data.datasets import SampleDataset, make_loader
    from medtl.data.transforms import eval_transform, train_transform
    from medtl.evaluate.metrics import binary_metrics
    from medtl.models import create_backbone
    from medtl.train import Supervised, balanced_class_weights, fit
    from medtl.train.inference import positive_probability

    path = out / "runs" / f"{fraction:g}_{init}_{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    backbone = create_backbone(backbone_name(init), num_classes=2, weights_dir=out / "weights")
    mean, std = backbone.cfg.mean, backbone.cfg.std
    batch = min(args.batch, len(train))
    epochs = max(1, math.ceil(args.steps[fraction] / math.ceil(len(train) / batch)))
    augment = AugmentConfig(flip=False, rotate_deg=10, scale=0.1)
    loader = make_loader(SampleDataset(train, train_transform(2, args.size, mean, std, augment)), batch,
                         shuffle=True, drop_last=True)
    evaluation = eval_transform(2, args.size, mean, std)
    val_loader = make_loader(SampleDataset(val, evaluation), 256, shuffle=False)
    y_val = np.array([r["label"] for r in val])
    best = {"val_auc": -1.0}
    every = max(1, epochs // args.val_checks)

    def keep_best(epoch: int, model: torch.nn.Module, logs: dict) -> None:
        if (epoch + 1) % every and epoch + 1 != epochs:
            return
        auc = float(roc_auc_score(y_val, positive_probability(model, val_loader, device="cpu")))
        logs["val_auc"] = auc
        if auc > best["val_auc"]:
            best.update(val_auc=auc, epoch=epoch + 1, state={k: v.clone() for k, v in model.state_dict().items()})

    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=args.lr, weight_decay=1e-4, warmup_epochs=0,
                      ema_decay=args.ema_decay, seed=seed, progress=False, device="cpu")
    t0 = time.perf_counter()
    class_weights = None
    if args.class_weight == "balanced":
        class_weights = balanced_class_weights([r["label"] for r in train], num_classes=2)
    fit(backbone, Supervised(class_weights=class_weights), loader, cfg, callbacks=[keep_best],
        description=f"{init} {fraction:g} s{seed}")
    seconds = time.perf_counter() - t0
    y_test = np.array([r["label"] for r in test])
    # the one look at the test split, for the recipe chosen on validation
    if probe["val_auc"] > best["val_auc"]:
        recipe, chosen_val_auc = "linear probe", probe["val_auc"]
        val_probability = probe["probe"].predict_proba(val_features)[:, 1]
        test_probability = probe["probe"].predict_proba(test_features)[:, 1]
    else:
        recipe, chosen_val_auc = "fine-tune", best["val_auc"]
        backbone.load_state_dict(best["state"])
        val_probability = positive_probability(backbone, val_loader, device="cpu")
        test_loader = make_loader(SampleDataset(test, evaluation), 256, shuffle=False)
        test_probability = positive_probability(backbone, test_loader, device="cpu")
    metrics = binary_metrics(y_test, test_probability, threshold=0.5, n_bootstrap=1000, seed=seed)
    result = {"init": init, "fraction": fraction, "seed": seed, "n_train": len(train), "epochs": epochs,
              "size": args.size, "ema_decay": args.ema_decay, "class_weights": class_weights,
              "recipe": recipe, "finetune_val_auc": best["val_auc"], "probe_val_auc": probe["val_auc"],
              "probe_C": probe["C"], "best_epoch": best["epoch"], "val_auc": chosen_val_auc, "seconds": seconds,
              "test_auc": metrics["auc"]["value"],
              "test_auc_ci": [metrics["auc"]["ci_low"], metrics["auc"]["ci_high"]],
              "test_acc": metrics["accuracy"]["value"],
              "test_acc_ci": [metrics["accuracy"]["ci_low"], metrics["accuracy"]["ci_high"]],
              # at the 0.5 threshold ACC is read at: which error ACC loses to (the test split has 62 % pneumonia,
              # train and validation 74 %)
              "test_sensitivity": metrics["sensitivity"]["value"], "test_specificity": metrics["specificity"]["value"],
              "test_predicted_positive": float((test_probability >= 0.5).mean()),
              "parameters": sum(p.numel() for p in backbone.parameters()),
              "val_probability": np.round(val_probability, 6).tolist(),
              "test_probability": np.round(test_probability, 6).tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log.info("%s", {k: v for k, v in result.items() if not k.endswith("_probability")})
    return result


def frozen_features(records: dict[str, list[dict]], out: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Each initialisation's frozen features of every split (and source-head probabilities of the training images),
    computed once: every label subset's scores and linear probes index into them."""
    from medtl.data.datasets import SampleDataset, make_loader
    from medtl.data.transforms import eval_transform
    from medtl.models import create_backbone
    from medtl.models.registry import get_backbone_cfg
    from medtl.train.inference import embed_with_source_head

    frozen = {}
    for init in args.inits:
        name, t0 = backbone_name(init), time.perf_counter()
        backbone = create_backbone(name, num_classes=get_backbone_cfg(name, out / "weights").pretrained_classes,
                                   weights_dir=out / "weights")
        transform = eval_transform(2, args.size, backbone.cfg.mean, backbone.cfg.std)
        frozen[init] = {}
        for split, split_records in records.items():
            loader = make_loader(SampleDataset(split_records, transform), 256, shuffle=False)
            frozen[init][split], probabilities = embed_with_source_head(backbone, loader)
            if split == "train":
                frozen[init]["probabilities"] = probabilities
                frozen[init]["seconds"] = time.perf_counter() - t0  # what a selection score pays to extract
    return frozen


def selection_scores(frozen: dict[str, dict], train: list[dict], index: np.ndarray, fraction: float, seed: int,
                     out: Path) -> dict:
    """Every score of every initialisation's frozen features on the labeled training subset ``index``."""
    from medtl.select import BackboneSelector

    path = out / "scores" / f"{fraction:g}_{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    features = {init: f["train"][index] for init, f in frozen.items()}
    probabilities = {init: f["probabilities"][index] for init, f in frozen.items() if f["probabilities"] is not None}
    y = np.array([r["label"] for r in train])
    selector = BackboneSelector(rank_by="logme").fit(features, y, source_probabilities=probabilities)
    result = {"scores": selector.scores_.drop(columns="rank").to_dict(orient="index"),
              "seconds": selector.seconds_.to_dict(orient="index"),
              "extract_seconds": {init: f["seconds"] for init, f in frozen.items()}, "best": selector.best_}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    return result


# ------------------------------------------------------------------------------------------- report


def summarise(runs: list[dict], scores: dict, args: argparse.Namespace) -> str:
    import pandas as pd

    from medtl.select.validation import validate_selection

    frame = pd.DataFrame(runs)
    lines = ["| labels | init | test AUC (mean ± sd, 3 seeds) | test ACC | AUC 95 % CI (seed 0) | val AUC | "
             "recipe chosen on val | min per seed |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for (fraction, init), group in frame.groupby(["fraction", "init"], sort=False):
        first = group.sort_values("seed").iloc[0]
        recipes = ", ".join(f"{name} ×{n}" for name, n in group.recipe.value_counts().items())
        lines.append(f"| {fraction:.0%} | {init} | {group.test_auc.mean():.3f} ± {group.test_auc.std():.3f} | "
                     f"{group.test_acc.mean():.3f} ± {group.test_acc.std():.3f} | "
                     f"{first.test_auc_ci[0]:.3f}–{first.test_auc_ci[1]:.3f} | {group.val_auc.mean():.3f} | "
                     f"{recipes} | {group.seconds.max() / 60:.1f} |")
    lines += ["", "Published, same test split: " + "; ".join(f"{k} AUC {a:.3f} / ACC {c:.3f}"
                                                             for k, (a, c) in PUBLISHED.items())]
    lines += ["", "| labels | score | weighted τ | Kendall τ | top pick | its val AUC | best val AUC | within 0.01 | "
                  "score s | fine-tune s |", "|---|---|---:|---:|---|---:|---:|---|---:|---:|"]
    for fraction in args.fractions:
        subset = frame[frame.fraction == fraction]
        finetuned = subset.groupby("init").val_auc.mean().to_dict()
        finetune_seconds = subset.groupby("init").seconds.mean().to_dict()
        fold = [scores[(fraction, seed)] for seed in args.seeds if (fraction, seed) in scores]
        if not fold:
            continue
        table = pd.DataFrame(fold[0]["scores"]).T
        secs = pd.DataFrame(fold[0]["seconds"]).T
        validation = validate_selection(table, secs, finetuned, finetune_seconds)
        for score, row in validation.iterrows():
            lines.append(f"| {fraction:.0%} | {score} | {row.weighted_tau:.2f} | {row.kendall_tau:.2f} | "
                         f"{row.top_pick} | {row.top_pick_result:.3f} | {row.finetuned_best:.3f} | "
                         f"{row.top_pick_within_tolerance} | "
                         f"{row.score_seconds:.2f} | {row.finetune_seconds:.0f} |")
    lines += ["", *label_shift_table(runs)]
    return "\n".join(lines)


def label_shift_table(runs: list[dict], n_bootstrap: int = 1000) -> list[str]:
    """The test split's pneumonia prevalence estimated from its *unlabeled* images (BBSE, EM; the source is the
    labeled validation split), and ACC at 0.5 before and after the prior correction, per run that kept its
    probabilities. The correction is the pipeline's with ``report.recalibrate: bcts`` and ``adapt.label_shift``:
    bias-corrected temperature scaling fitted on validation, then the posterior re-weighted to the estimated
    prevalence (Saerens et al. 2002). The row that corrects to the *true* test prevalence reads test labels: an
    upper bound, labelled so."""
    from medtl.adapt.label_shift import LabelShiftEstimator, prior_corrected
    from medtl.evaluate.calibration import TemperatureScaling, as_two_class
    from medtl.evaluate.metrics import binary_metrics

    data = np.load(DATA)
    y_val, y_test = data["val_labels"][:, 0].astype(int), data["test_labels"][:, 0].astype(int)
    kept = [r for r in runs if "test_probability" in r]
    if not kept:
        return []
    lines = [f"Label shift: test prevalence {y_test.mean():.3f}, validation {y_val.mean():.3f}; estimated from the "
             "test images without their labels, with a 95 % bootstrap interval; ACC at 0.5 with its 95 % CI.", "",
             "| labels | init | seed | ACC at 0.5 | BBSE prevalence | ACC, BBSE-corrected | EM prevalence | "
             "ACC, EM-corrected | ACC, corrected to the true prevalence (upper bound: reads test labels) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in kept:
        val, test = np.asarray(run["val_probability"]), np.asarray(run["test_probability"])
        calibration = TemperatureScaling(bias=True).fit(val, y_val)
        calibrated = as_two_class(calibration.transform(test))
        source_prior = np.array([1 - y_val.mean(), y_val.mean()])

        def accuracy(prob: np.ndarray) -> str:
            m = binary_metrics(y_test, prob, threshold=0.5, n_bootstrap=n_bootstrap, seed=run["seed"])["accuracy"]
            return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

        cells = [accuracy(test)]
        for method in ("bbse", "em"):
            estimator = LabelShiftEstimator(method=method, n_bootstrap=n_bootstrap, seed=run["seed"]).fit(
                val, y_val, test)
            corrected = prior_corrected(calibrated, source_prior, estimator.target_prior_)[:, 1]
            cells += [f"{estimator.target_prior_[1]:.3f} [{estimator.ci_low_[1]:.3f}, {estimator.ci_high_[1]:.3f}]",
                      accuracy(corrected)]
        truth = np.array([1 - y_test.mean(), y_test.mean()])
        cells.append(accuracy(prior_corrected(calibrated, source_prior, truth)[:, 1]))
        lines.append(f"| {run['fraction']:.0%} | {run['init']} | {run['seed']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_pneumoniamnist")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--inits", nargs="+", default=list(INITS), type=init_name,
                        help="initialisations: scratch, imagenet, ssl, and ssl_ep<N> for the SSL backbone after N "
                             "epochs (every k-NN check but the last is exported)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="fine-tune with a moving average of the weights (TrainConfig.ema_decay); the "
                             "validation checks and the test evaluation use the averaged weights")
    parser.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                        help="fine-tuning loss: plain cross-entropy, or classes weighted by inverse training "
                             "frequency (Supervised(class_weights=balanced_class_weights(...))), and the linear "
                             "probe alike")
    parser.add_argument("--val-checks", type=int, default=6, help="validation AUC checks per run (model selection)")
    parser.add_argument("--ssl-method", default="simclr", choices=["simclr", "moco", "byol", "vicreg"])
    parser.add_argument("--ssl-epochs", type=int, default=10)
    parser.add_argument("--ssl-batch", type=int, default=128)
    parser.add_argument("--ssl-lr", type=float, default=3e-4)
    parser.add_argument("--skip-throughput", action="store_true",
                        help="skip the SSL step-throughput comparison (e.g. when adding runs to a finished grid)")
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke run: 1 seed, tiny budgets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.data.is_file():
        raise SystemExit(f"{args.data} not found: this benchmark needs ../shared/data/pneumoniamnist_28.npz")
    # optimizer steps per run, by label fraction: the same budget for every initialisation
    args.steps = {0.01: 120, 0.1: 300, 1.0: 450}
    if args.quick:
        args.seeds, args.ssl_epochs, args.steps = args.seeds[:1], 1, {f: 10 for f in args.fractions}
        args.out = args.out.with_name(args.out.name + "_quick")
    args.steps = {f: args.steps.get(f, 300) for f in args.fractions}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = prepare(args.data, args.out, args.size)

    if any(init.startswith("ssl") for init in args.inits):
        card = pretrain_ssl(records, args.out, args)
        print(f"SSL ({card['method']}, {card['epochs']} epochs, {card['seconds'] / 60:.1f} min): k-NN val accuracy "
              f"{card['knn_before']:.3f} (ImageNet) -> " + ", ".join(f"ep {c['epoch']}: {c['knn_acc']:.3f}"
                                                                   for c in card["knn_curve"]))
    if not args.skip_throughput:
        throughput = ssl_throughput(args)
        print(f"SSL step throughput, medtl fit vs lightly's loop: {throughput['ratio_median']:.2f}x "
              f"({throughput['medtl_images_per_s']:.1f} vs {throughput['lightly_images_per_s']:.1f} images/s; "
              "rounds " + ", ".join(f"{r:.2f}" for r in throughput["ratios"]) + ")")

    runs, scores = [], {}
    frozen = frozen_features(records, args.out, args)
    train_labels = np.array([r["label"] for r in records["train"]])
    val_labels = np.array([r["label"] for r in records["val"]])
    for fraction in args.fractions:
        for seed in args.seeds:
            index = label_subset(train_labels, fraction, seed)
            train = [records["train"][i] for i in index]
            scores[(fraction, seed)] = selection_scores(frozen, train, index, fraction, seed, args.out)
            for init in args.inits:
                probe = linear_probe(frozen[init], index, train_labels[index], val_labels,
                                     class_weight=None if args.class_weight == "none" else args.class_weight)
                runs.append(finetune(init, train, records["val"], records["test"], fraction, seed, args.out, args,
                                     probe, frozen[init]["val"], frozen[init]["test"]))
    table = summarise(runs, scores, args)
    print(table)
    (args.out / "summary.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
