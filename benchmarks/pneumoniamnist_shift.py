"""Cross-hospital shift on real chest radiographs: fine-tuning strategies, adaptation plugins, unsupervised
model selection, leave-one-hospital-out and multi-source training, on PneumoniaMNIST split into simulated hospitals.

Data: ``../shared/data/pneumoniamnist_28.npz`` (MedMNIST v2 PneumoniaMNIST, official splits). Per seed, the
official *train* and *val* images are dealt into disjoint hospitals by :func:`medtl.data.shift.simulate_hospitals`,
each re-acquired with its own :class:`~medtl.data.shift.AcquisitionProfile` (one hospital also gets a
label-prevalence shift). Every hospital's *test* set is the whole official test split re-acquired with that
hospital's profile (noise fixed across seeds, so the seeds are scored on the same images and a joint bootstrap of
the seed-mean AUC is well defined); the prevalence-shifted hospital's test set is resampled to its prevalence.

Everything runs through the product's own stages, on a workspace whose manifest holds these hospitals (with the
official splits in the manifest's ``split`` column), so what is measured is what a user runs:

* ``run_finetune`` with every fine-tuning strategy on the source hospital (ImageNet EfficientNet-Lite0; ``full``
  also trains the negative-transfer gate's scratch baseline);
* ``run_adapt`` per target hospital, from the ``full`` model, with every method (``source_only`` is the same
  training with the zero plugin; ``--regs 0.3 1.0`` trains every loss plugin once per weight) and unsupervised
  selection of (method, epoch) by EnsV (the stage's default scorer), DEV, IWCV, SND and entropy, next to the
  offline oracle pick that reads target labels;
* the *target-supervised oracle*: ``run_finetune`` on the target hospital's own labeled training images;
* *leave-one-hospital-out*: ``run_leave_one_hospital_out``: fine-tuning on every other hospital's labeled images
  (multi-source training, the domain-generalisation baseline), evaluated on the held-out hospital.

Gap recovery on a target = (AUC of the best adaptation - AUC of source_only) / (AUC of the target-supervised
oracle - AUC of source_only), on seed-mean test AUCs. The hardest shift is the target with the largest
source_only-to-oracle gap.

Run: ``.venv/bin/python benchmarks/pneumoniamnist_shift.py`` (about 1 h on 2 CPU cores; finished runs are
kept under ``--out`` and skipped); ``--quick`` for a few-minute smoke run. Results go to ``--out/results.md``.
``--rescore`` re-runs only the adapt stage of finished seeds: every ``fit`` resumes its finished checkpoint, so
nothing trains; every candidate is re-evaluated from its saved weights and selected again with the current
scorers (minutes, where the full run takes an hour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from medtl.config import AdaptConfig, DataConfig, FinetuneConfig, TrainConfig
from medtl.data.shift import PRESET_PROFILES, AcquisitionProfile, resample_prevalence, simulate_acquisition, \
    simulate_hospitals
from medtl.evaluate.metrics import binary_metrics
from medtl.ingest.manifest import MANIFEST_COLUMNS, as_table, write_table_atomic
from medtl.select.unsupervised import UnsupervisedSelector
from medtl.stages import adaptation_runs, run_adapt, run_finetune, run_leave_one_hospital_out
from medtl.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pneumoniamnist_28.npz"
BACKBONE = "efficientnet_lite0.imagenet"
SOURCE = PRESET_PROFILES["reference"]
TARGETS = (
    PRESET_PROFILES["low_dose_portable"],
    AcquisitionProfile("old_detector_collimated", blur_sigma=1.5, downsample_factor=2.0, read_noise_sigma=0.01,
                       contrast=-3.0, collimation=0.12, crop=0.1),
    AcquisitionProfile("inverted_mis_windowed", invert=True, window_center=0.55, window_width=0.7),
)
# the portable unit's hospital sees fewer pneumonia cases (PneumoniaMNIST is 74 % pneumonia in train)
PREVALENCE = {"low_dose_portable": 0.45}
# every fine-tuning strategy, plus the layer-wise learning-rate decay and BatchNorm policies on top of "full"
STRATEGIES = {"full": {}, "linear_probe": {}, "freeze": {"freeze_groups": 3}, "gradual_unfreeze": {},
              "lp_ft": {"lp_epochs": 2}, "l2sp": {}, "lora": {}, "full+layer_decay": {"layer_decay": 0.7},
              "full+batchnorm_frozen": {"batchnorm": "frozen"}, "full+batchnorm_adabn": {"batchnorm": "adabn"}}
METHODS = ("source_only", "adabn", "tent", "coral", "mmd", "dann", "ot", "pseudo_label")
SCORERS = ("ensv", "dev", "iwcv", "snd", "entropy")

log = logging.getLogger("benchmark")


# ---------------------------------------------------------------------------------------------- data


def _hospitals(seed: int, data: np.lib.npyio.NpzFile) -> dict[str, dict[str, dict]]:
    """Per hospital and official split: images (n, 1, 28, 28) in [0, 1], labels, ids (``<split>-<index>``)."""
    profiles = (SOURCE, *TARGETS)
    prevalences = [PREVALENCE.get(p.name) for p in profiles]
    out: dict[str, dict[str, dict]] = {p.name: {} for p in profiles}
    for split in ("train", "val"):
        images = data[f"{split}_images"].astype(np.float32)[:, None] / 255.0
        labels = data[f"{split}_labels"].reshape(-1).astype(np.int64)
        for site in simulate_hospitals(images, labels, profiles, prevalences, seed=seed):
            out[site["name"]][split] = {"images": site["images"], "labels": site["labels"],
                                        "ids": [f"{split}-{i}" for i in site["indices"]]}
    images = data["test_images"].astype(np.float32)[:, None] / 255.0
    labels = data["test_labels"].reshape(-1).astype(np.int64)
    for h, profile in enumerate(profiles):
        keep = (np.arange(len(labels)) if profile.name not in PREVALENCE
                else resample_prevalence(labels, PREVALENCE[profile.name], np.random.default_rng([1000, h])))
        # the test noise does not depend on the run seed: every seed is scored on the same images
        shifted = np.stack([simulate_acquisition(images[i], profile, np.random.default_rng([1000, h, int(i)]))
                            for i in keep])
        out[profile.name]["test"] = {"images": shifted, "labels": labels[keep], "ids": [f"test-{i}" for i in keep]}
    return out


def write_arrays(hospitals: dict[str, dict[str, dict]], folder: Path) -> pd.DataFrame:
    """Store every image as ``.npy`` and return manifest rows (all labeled, ``split`` = the official split)."""
    rows = []
    for hospital, splits in hospitals.items():
        (folder / hospital).mkdir(parents=True, exist_ok=True)
        for split, part in splits.items():
            for image, label, image_id in zip(part["images"], part["labels"], part["ids"]):
                path = folder / hospital / f"{image_id}.npy"
                if not path.exists():
                    np.save(path, image.astype(np.float32), allow_pickle=False)
                uid = f"{hospital}.{image_id}"
                rows.append({"image": str(path.resolve()), "volume": "", "label": int(label), "patient_id": image_id,
                             "study_uid": uid, "series_uid": uid, "sop_uid": uid, "hospital": hospital,
                             "vendor": hospital, "model": "", "modality": "CR",
                             "content_hash": hashlib.sha256(image.tobytes() + uid.encode()).hexdigest(),
                             "rows": image.shape[-2], "columns": image.shape[-1], "pixel_spacing_mm": float("nan"),
                             # MedMNIST ships 8-bit grey-scale PNGs resized to 28 x 28: the original acquisition
                             # (matrix, view) is not known here
                             "bits_stored": 8, "photometric": "MONOCHROME2", "view_position": "", "body_part": "CHEST",
                             "sex": "", "age": float("nan"), "study_date": "", "split": split})
    return as_table(rows, MANIFEST_COLUMNS)


def workspace(root: Path, manifest: pd.DataFrame) -> Workspace:
    ws = Workspace(root)
    ws.ingest.mkdir(parents=True, exist_ok=True)
    if not ws.manifest.exists():
        write_table_atomic(manifest, ws.manifest)
    return ws


def unlabeled_targets(manifest: pd.DataFrame) -> pd.DataFrame:
    """The adaptation setting: a target hospital's train and val images come without labels."""
    out = manifest.copy()
    # assign_splits then marks these rows "unlabeled", whatever their official split
    out.loc[(out["hospital"] != SOURCE.name) & (out["split"] != "test"), "label"] = pd.NA
    return out


# ---------------------------------------------------------------------------------------------- runs


def test_predictions(predictions: pd.DataFrame, hospital: str) -> pd.DataFrame:
    rows = predictions[(predictions["hospital"] == hospital) & predictions["patient_id"].str.startswith("test-")]
    return rows.sort_values("patient_id")


def _data(args: argparse.Namespace, sources: list[str], target: str) -> DataConfig:
    return DataConfig(source_hospitals=sources, target_hospital=target, image_size=args.size)


def _finetune_cfg(args: argparse.Namespace, strategy: str, seed: int, scratch: bool = False) -> FinetuneConfig:
    return FinetuneConfig(backbone=BACKBONE, strategy=strategy.split("+")[0], scratch_baseline=scratch,
                          **STRATEGIES[strategy],
                          train=TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, seed=seed, progress=False))


def _predictions(ws: Workspace, stage: str) -> pd.DataFrame:
    return pd.read_parquet(getattr(ws, stage) / "predictions.parquet")


def _adapt_cfg(args: argparse.Namespace, seed: int = 0) -> AdaptConfig:
    return AdaptConfig(methods=list(METHODS), reg=args.regs,
                       train=TrainConfig(epochs=args.adapt_epochs, batch_size=64, lr=3e-4, seed=seed, progress=False))


def adapt_target(root: Path, target: AcquisitionProfile, manifest: pd.DataFrame, seed: int,
                 args: argparse.Namespace) -> dict:
    """``run_adapt`` from the seed's ``full`` model to one target hospital, with the stage's default scorer;
    re-running it on a finished workspace trains nothing (every ``fit`` resumes its last checkpoint)."""
    t0 = time.perf_counter()
    ws = workspace(root / f"adapt_{target.name}", manifest)
    if not ws.finetune.exists():
        ws.finetune.symlink_to((root / "finetune_full" / "finetune").resolve())
    run_adapt(_adapt_cfg(args, seed), _data(args, [SOURCE.name], target.name), ws)
    frame = _predictions(ws, "adapt")
    selection = json.loads((ws.adapt / "selection.json").read_text())
    log.info("seed %d adapt %s: %.0f s", seed, target.name, time.perf_counter() - t0)
    return {"probs": {m: test_predictions(g, target.name)["prob"].round(6).tolist() for m, g in frame.groupby("model")},
            "scorer": selection["scorer"], "n_candidates": len(selection["candidates"]),
            "ensv_per_reg": ensv_per_reg(ws, selection, args),
            "picks": {s: {k: p.get(k) for k in ("candidate", "target_auc", "auc_gap_to_oracle")}
                      for s, p in selection["picks"].items()},
            "oracle_pick": {k: selection["oracle"].get(k) for k in ("candidate", "target_auc")},
            "seconds": time.perf_counter() - t0}


def ensv_per_reg(ws: Workspace, selection: dict, args: argparse.Namespace) -> dict[str, dict]:
    """EnsV's pick when the pool holds only one ``reg`` value's runs (plus source_only, adabn and tent), from the
    same trained candidates' saved target probabilities: the pools compare side by side, with no training noise
    between them. Keyed by the reg value; empty with a single value."""
    if len(args.regs) < 2:
        return {}
    probabilities = load_file(str(ws.adapt / "target_probabilities.safetensors"))
    reg_of = {run: reg for run, _, reg in adaptation_runs(_adapt_cfg(args))}
    out = {}
    for reg in args.regs:
        pool = {row["candidate"]: row for row in selection["candidates"] if reg_of[row["method"]] in (None, reg)}
        # the stage's own selector and tie-break, on the scorer inputs it saved (predictions only: ensv needs no more)
        best = UnsupervisedSelector(scorer="ensv").fit(
            {name: {"target_probabilities": probabilities[name].numpy()} for name in pool}).best_
        pick, oracle = pool[best], max(pool.values(), key=lambda row: row["target_auc"])
        out[f"{reg:g}"] = {"n_candidates": len(pool), "candidate": pick["candidate"],
                           "target_auc": pick["target_auc"],
                           "oracle": oracle["candidate"], "oracle_auc": oracle["target_auc"],
                           "auc_gap_to_oracle": oracle["target_auc"] - pick["target_auc"]}
    return out


def run_seed(seed: int, data: np.lib.npyio.NpzFile, args: argparse.Namespace) -> dict:
    """Every run of one seed; each run's result is a JSON file, skipped when present (with ``args.rescore``,
    only the adapt stage runs again: selection only, nothing trains)."""
    root = args.out / f"seed{seed}"
    done = root / "result.json"
    if done.exists() and not args.rescore:
        return json.loads(done.read_text())
    labeled = write_arrays(_hospitals(seed, data), root / "arrays")
    adapt_manifest = unlabeled_targets(labeled)
    if done.exists():
        result = json.loads(done.read_text())
        for t in TARGETS:  # the time stays that of the run that trained the candidates
            result["adapt"][t.name] = {**adapt_target(root, t, adapt_manifest, seed, args),
                                       "seconds": result["adapt"][t.name]["seconds"]}
        done.write_text(json.dumps(result))
        return result
    names = [SOURCE.name, *(t.name for t in TARGETS)]
    result: dict = {"seed": seed, "finetune": {}, "adapt": {}, "oracle": {}, "loho": {}, "counts": {}}
    for h in names:
        rows = labeled[labeled["hospital"] == h]
        result["counts"][h] = {s: int((rows["split"] == s).sum()) for s in ("train", "val", "test")}

    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        ws = workspace(root / f"finetune_{strategy}", adapt_manifest)
        card = run_finetune(_finetune_cfg(args, strategy, seed, scratch=strategy == "full"),
                            _data(args, [SOURCE.name], TARGETS[0].name), ws)
        frame = _predictions(ws, "finetune")
        result["finetune"][strategy] = {
            "probs": {h: test_predictions(frame, h)["prob"].round(6).tolist() for h in names},
            "trainable_params": card["trainable_params"], "val_auc": card["val_auc"],
            "negative_transfer": card["negative_transfer"], "seconds": time.perf_counter() - t0}
        log.info("seed %d finetune %s: %.0f s", seed, strategy, time.perf_counter() - t0)
    for target in TARGETS:
        result["adapt"][target.name] = adapt_target(root, target, adapt_manifest, seed, args)
    for target in TARGETS:
        ws = workspace(root / f"oracle_{target.name}", labeled)
        others = [n for n in names if n != target.name]
        run_finetune(_finetune_cfg(args, "full", seed), _data(args, [target.name], others[0]), ws)
        result["oracle"][target.name] = test_predictions(_predictions(ws, "finetune"), target.name)["prob"].round(
            6).tolist()
    ws = workspace(root / "loho", labeled)
    run_leave_one_hospital_out(_finetune_cfg(args, "full", seed), _data(args, [SOURCE.name], TARGETS[0].name), ws,
                               n_bootstrap=0)
    frame = _predictions(ws, "loho")
    for held_out in names:  # scored on the held-out hospital's test images, as every other row of the tables
        result["loho"][held_out] = test_predictions(frame[frame["model"] == f"loho:{held_out}"], held_out)[
            "prob"].round(6).tolist()
    result["labels"] = {h: labeled[(labeled["hospital"] == h) & (labeled["split"] == "test")]
                        .sort_values("patient_id")["label"].astype(int).tolist() for h in names}
    done.write_text(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------- summary


def seed_mean_auc(labels: np.ndarray, probs: list[list[float]], n_bootstrap: int = 1000) -> dict:
    """Mean over seeds of the test AUC, with a bootstrap CI that resamples test images jointly for all seeds."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    per_seed = [binary_metrics(y, row, n_bootstrap=0)["auc"]["value"] for row in p]
    rng = np.random.default_rng(0)
    reps = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        reps.append(np.mean([binary_metrics(y[idx], row[idx], n_bootstrap=0)["auc"]["value"] for row in p]))
    low, high = np.percentile(reps, [2.5, 97.5])
    return {"auc": float(np.mean(per_seed)), "low": float(low), "high": float(high), "per_seed": per_seed}


def _spearman(score: list, auc: list) -> float:
    """Rank correlation over the candidates that have both numbers (NaN when fewer than 3 do)."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(score, auc) if a is not None and b is not None]
    return float(spearmanr(*zip(*pairs)).statistic) if len(pairs) >= 3 else float("nan")


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    names = [SOURCE.name, *(t.name for t in TARGETS)]
    labels = results[0]["labels"]
    auc = {}  # (row, hospital) -> stats

    def add(row: str, hospital: str, probs: list[list[float]]) -> None:
        auc[(row, hospital)] = seed_mean_auc(np.asarray(labels[hospital]), probs, args.n_bootstrap)

    for strategy in STRATEGIES:
        for h in names:
            add(f"finetune:{strategy}", h, [r["finetune"][strategy]["probs"][h] for r in results])
    runs = [run for run, _, _ in adaptation_runs(_adapt_cfg(args))]
    for t in TARGETS:
        for m in runs:
            add(f"adapt:{m}", t.name, [r["adapt"][t.name]["probs"][m] for r in results])
        add("oracle", t.name, [r["oracle"][t.name] for r in results])
    for h in names:
        add("loho", h, [r["loho"][h] for r in results])

    def cell(row: str, h: str) -> str:
        s = auc.get((row, h))
        return "" if s is None else f"{s['auc']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"

    seeds = [r["seed"] for r in results]
    lines = [f"Seeds {seeds}; image size {args.size}; fine-tuning {args.epochs} epochs, adaptation "
             f"{args.adapt_epochs} epochs, adaptation-loss weight reg {args.regs}. AUC = mean over seeds of the "
             f"test AUC, [95 % CI] from a bootstrap of test images shared by all seeds ({args.n_bootstrap} "
             "resamples).", ""]
    c = results[0]["counts"]
    lines += ["| hospital | profile | train | val | test (prevalence) |", "|---|---|---|---|---|"]
    for h in names:
        prof = next(p for p in (SOURCE, *TARGETS) if p.name == h)
        changes = {k: v for k, v in prof.__dict__.items() if k != "name" and v != getattr(SOURCE, k)}
        lines.append(f"| {h} | {changes or 'reference'} | {c[h]['train']} | {c[h]['val']} | {c[h]['test']} "
                     f"({np.mean(labels[h]):.2f}) |")
    lines += ["", "**Fine-tuning strategies** (trained on the source hospital only):", "",
              "| strategy | trained params | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for strategy in STRATEGIES:
        params = results[0]["finetune"][strategy]["trainable_params"]
        lines.append(f"| {strategy} | {params:,} | " + " | ".join(cell(f"finetune:{strategy}", h) for h in names)
                     + " |")
    gates = [r["finetune"]["full"]["negative_transfer"] for r in results]
    lines += ["", "Negative-transfer gate (full vs scratch, source validation AUC): "
              + "; ".join(f"seed {r['seed']}: {g.get('message', g)}" for r, g in zip(results, gates)), ""]
    targets = [t.name for t in TARGETS]
    lines += ["**Adaptation** (from the `full` model; source labeled + target unlabeled; test AUC on the target):",
              "", "| method | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for m in runs:
        lines.append(f"| {m} | " + " | ".join(cell(f"adapt:{m}", t) for t in targets) + " |")
    lines.append("| multi-source (trained on the other hospitals, labeled) | "
                 + " | ".join(cell("loho", t) for t in targets) + " |")
    lines.append("| target-supervised oracle | " + " | ".join(cell("oracle", t) for t in targets) + " |")
    def recovered(value: float, so: float, orc: float) -> str:
        return f"{(value - so) / (orc - so) * 100:.0f} %" if orc > so else "n/a (source_only >= oracle)"

    scorer = results[0]["adapt"][TARGETS[0].name].get("scorer", "dev")  # results from before EnsV used dev
    lines += ["", "**Gap recovery** = (adaptation - source_only) / (oracle - source_only). *Best adaptation* is the "
              "method with the highest seed-mean test AUC (chosen with test labels: an upper bound); the *"
              f"{scorer} pick* is the (method, epoch) that the stage's scorer ({scorer}) chose without target "
              "labels, what a user would deploy (its test AUC, mean over seeds):", "",
              f"| target | source_only | best adaptation | recovered | {scorer} pick | recovered | oracle |",
              "|---|---|---|---|---|---|---|"]
    gaps = {}
    for t in targets:
        so, orc = auc[("adapt:source_only", t)]["auc"], auc[("oracle", t)]["auc"]
        best = max((m for m in runs if m != "source_only"), key=lambda m: auc[(f"adapt:{m}", t)]["auc"])
        b = auc[(f"adapt:{best}", t)]["auc"]
        picked = float(np.mean([r["adapt"][t]["picks"][scorer]["target_auc"] for r in results]))
        gaps[t] = orc - so
        lines.append(f"| {t} | {so:.3f} | {best} {b:.3f} | {recovered(b, so, orc)} | {picked:.3f} | "
                     f"{recovered(picked, so, orc)} | {orc:.3f} |")
    hardest = max(gaps, key=gaps.get)
    lines += ["", f"Hardest shift (largest source_only-to-oracle gap): **{hardest}**.", "",
              "**Unsupervised selection** of (method, epoch) among all candidates on the target, without target "
              "labels; AUC gap to the oracle pick (which reads target labels), mean over seeds (max):", "",
              "| target | " + " | ".join(SCORERS) + " |", "|---|" + "---|" * len(SCORERS)]
    for t in targets:
        cells = []
        for s in SCORERS:
            g = [r["adapt"][t]["picks"][s]["auc_gap_to_oracle"] for r in results]
            g = [x for x in g if x is not None]
            picks = ", ".join(str(r["adapt"][t]["picks"][s]["candidate"]) for r in results)
            cells.append(f"{np.mean(g):.3f} ({np.max(g):.3f}): {picks}" if g else "n/a")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if len(args.regs) > 1:
        lines += ["", "**EnsV over a wider pool, side by side**: the same trained candidates, pooled with every reg "
                  "value (the stage's pick) or with one value's runs only (plus source_only, adabn and tent); pick's "
                  "test AUC, the pool's oracle, and the gap, mean over seeds (max), picks per seed:", "",
                  "| target | pool | candidates | EnsV pick AUC | pool's oracle AUC | gap mean (max) | picks |",
                  "|---|---|---|---|---|---|---|"]
        for t in targets:
            rows = {"all": [{**r["adapt"][t]["picks"]["ensv"], "n_candidates": r["adapt"][t]["n_candidates"],
                             "oracle_auc": r["adapt"][t]["oracle_pick"]["target_auc"]} for r in results]}
            rows |= {f"reg {reg:g} only": [r["adapt"][t]["ensv_per_reg"][f"{reg:g}"] for r in results]
                     for reg in args.regs}
            for pool, per_seed in rows.items():
                gaps = [x["auc_gap_to_oracle"] for x in per_seed]
                lines.append(f"| {t} | {pool} | {per_seed[0]['n_candidates']} | "
                             f"{np.mean([x['target_auc'] for x in per_seed]):.3f} | "
                             f"{np.mean([x['oracle_auc'] for x in per_seed]):.3f} | {np.mean(gaps):.3f} "
                             f"({np.max(gaps):.3f}) | {', '.join(x['candidate'] for x in per_seed)} |")
    lines += ["", "**Does each score order the candidates?** Spearman correlation between the score and the "
              "candidates' target AUC over the (method, epoch) candidates of each run (`adapt/selection.json`), per "
              "seed:", "", "| target | " + " | ".join(SCORERS) + " |", "|---|" + "---|" * len(SCORERS)]
    for t in targets:
        rows = [json.loads((args.out / f"seed{r['seed']}" / f"adapt_{t}" / "adapt" / "selection.json").read_text())[
            "candidates"] for r in results]
        lines.append(f"| {t} | " + " | ".join(
            " / ".join(f"{_spearman([c[s] for c in run], [c['target_auc'] for c in run]):.2f}" for run in rows)
            for s in SCORERS) + " |")
    lines += ["", "**Leave-one-hospital-out** (multi-source training on the other hospitals):", "",
              "| held-out hospital | AUC |", "|---|---|"]
    lines += [f"| {h} | {cell('loho', h)} |" for h in names]
    minutes = sum(sum(v["seconds"] for v in r["finetune"].values()) + sum(v["seconds"] for v in r["adapt"].values())
                  for r in results) / 60
    lines += ["", f"Fine-tuning and adaptation time: {minutes:.0f} min over {len(results)} seeds."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_shift")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--adapt-epochs", type=int, default=3)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--regs", type=float, nargs="+", default=[1.0],
                        help="adaptation-loss weights; several train every loss plugin once per value, widening "
                             "the pool that unsupervised selection chooses from")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch each: a smoke run")
    parser.add_argument("--rescore", action="store_true",
                        help="finished seeds: re-run only the adapt stage's selection (nothing trains)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: this benchmark needs ../shared/data/pneumoniamnist_28.npz")
    if args.quick:
        args.seeds, args.epochs, args.adapt_epochs, args.n_bootstrap = args.seeds[:1], 3, 1, 100
        args.out = args.out.with_name(args.out.name + "_quick")
    data = np.load(args.data)
    results = [run_seed(seed, data, args) for seed in args.seeds]
    text = summarise(results, args)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
