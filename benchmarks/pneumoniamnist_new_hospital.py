"""What a new hospital can expect before anyone labels its images: the finding's prevalence, the deployed model's
AUC and accuracy estimated without labels, and backbone selection that looks at the new hospital.

Data: the shift benchmark's simulated hospitals (``benchmarks/pneumoniamnist_shift.py``: PneumoniaMNIST's official
train and val images dealt into a source and three target hospitals, each re-acquired with its own acquisition
profile; ``low_dose_portable`` also has 45 % pneumonia against 74 %). The targets' train and val images come without
labels; every hospital's test images are labeled and only measure. Everything runs through the product's stages:

1. **Deployment at a new hospital** (per target): ``run_finetune`` (ImageNet EfficientNet-Lite0, full) on the
   source, ``run_adapt`` to the target (source_only, adabn, tent, coral, mmd), then ``medtl.deploy.run_deploy``. From
   ``deploy/analysis.json``: the prevalence BBSE and EM estimate at every hospital (the target from its unlabeled
   images, the others from their test images, labels unused) next to the true one, and ATC's and the adaptation
   candidates' agreement estimate of the deployed model's AUC next to its measured test AUC: mean absolute error.
2. **Target-aware backbone selection** (per target): candidates ``efficientnet_lite0.imagenet``, ``.ssl``
   (SimCLR on the source hospital's images, ``run_pretrain``), ``.scratch`` and ``resnet18.scratch``; each is
   fine-tuned on the source (``run_finetune``, full), and its AUC on the target's test images is the measured
   transfer. ``run_select`` ranks them by the source alone (LogME) and target-aware (the select stage's default
   when a target is set); Kendall and weighted τ of each ranking against the measured target AUC.

Run: ``.venv/bin/python benchmarks/pneumoniamnist_new_hospital.py`` (finished runs under ``--out`` are kept and
skipped); ``--quick`` for a smoke run. Results go to ``--out/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medtl.config import (AdaptConfig, DataConfig, FinetuneConfig, PipelineConfig, PretrainConfig, ReportConfig,
                          SelectConfig, TrainConfig)
from medtl.deploy import run_deploy
from medtl.evaluate.metrics import binary_metrics
from medtl.select.target_aware import ranking_agreement
from medtl.stages import run_adapt, run_finetune, run_pretrain, run_select
from medtl.workspace import Workspace
from pneumoniamnist_shift import DATA, REPO, SOURCE, TARGETS, _hospitals, unlabeled_targets, workspace, write_arrays

CANDIDATES = ("efficientnet_lite0.imagenet", "efficientnet_lite0.ssl", "efficientnet_lite0.scratch",
              "resnet18.scratch")
METHODS = ("source_only", "adabn", "tent", "coral", "mmd")
log = logging.getLogger("benchmark")


def _train(args: argparse.Namespace, seed: int, epochs: int, lr: float = 1e-3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=64, lr=lr, seed=seed, progress=False)


def _data(args: argparse.Namespace, target: str) -> DataConfig:
    return DataConfig(source_hospitals=[SOURCE.name], target_hospital=target, image_size=args.size)


def _link(ws: Workspace, folder: str, source: Path) -> None:
    link = ws.root / folder
    if not link.exists():
        link.symlink_to(source.resolve())


def deployment(root: Path, manifest: pd.DataFrame, labeled: pd.DataFrame, target: str, seed: int,
               args: argparse.Namespace) -> dict:
    """Fine-tune (shared by the targets), adapt, deploy; the deploy step's estimates next to the truth."""
    tuned = workspace(root / "finetune", manifest)
    if not (tuned.finetune / "model.safetensors").exists():
        run_finetune(FinetuneConfig(backbone=CANDIDATES[0], train=_train(args, seed, args.epochs)),
                     _data(args, target), tuned)
    ws = workspace(root / f"deploy_{target}", manifest)
    _link(ws, "finetune", tuned.finetune)
    config = PipelineConfig(workdir=ws.root, data=_data(args, target),
                            adapt=AdaptConfig(methods=list(METHODS), label_shift="em",
                                              train=_train(args, seed, args.adapt_epochs, 3e-4)),
                            report=ReportConfig(n_bootstrap=args.n_bootstrap))
    if not (ws.adapt / "selection.json").exists():
        run_adapt(config.adapt, config.data, ws)
    if not (ws.deploy / "analysis.json").exists():
        run_deploy(config, ws)
    analysis = json.loads((ws.deploy / "analysis.json").read_text())
    predictions = pd.read_parquet(ws.deploy / "predictions.parquet")
    card = json.loads((ws.deploy / "model.json").read_text())
    sites = {}
    for hospital, estimates in analysis["performance_estimates"].items():
        rows = predictions[predictions["hospital"] == hospital]
        measured = binary_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), threshold=card["threshold"],
                                  n_bootstrap=0)
        prevalence = analysis["prevalence"][hospital]
        # the images each estimate read: the target's unlabeled ones (truth from the labels the benchmark withheld),
        # every other hospital's test images
        if hospital == target:
            read = labeled[(labeled["hospital"] == hospital) & (labeled["split"] != "test")]
        else:
            read = labeled[(labeled["hospital"] == hospital) & (labeled["split"] == "test")]
        sites[hospital] = {"role": estimates["role"], "measured_auc": measured["auc"]["value"],
                           "measured_accuracy": measured["accuracy"]["value"],
                           "true_prevalence": float(read["label"].mean()),
                           "prevalence": {m: prevalence[m] for m in ("bbse", "em")},
                           "estimates": {m: {"auc": estimates[m]["auc"], "accuracy": estimates[m]["accuracy"]}
                                         for m in ("atc", "agreement") if m in estimates}}
    return {"deployed": card["origin"]["description"], "sites": sites}


def selection(root: Path, manifest: pd.DataFrame, target: str, seed: int, args: argparse.Namespace) -> dict:
    """Both rankings of the candidates for ``target`` and each candidate's measured AUC at the target."""
    pool = workspace(root / "select_pool", manifest)
    if not (pool.weights / "efficientnet_lite0.ssl.safetensors").exists():
        run_pretrain(PretrainConfig(init=CANDIDATES[0], hospitals=[SOURCE.name], knn_every=args.ssl_epochs,
                                    train=_train(args, seed, args.ssl_epochs, 5e-4)), _data(args, target), pool)
    measured = {}
    for name in CANDIDATES:
        ws = workspace(root / f"candidate_{name}", manifest)
        _link(ws, "weights", pool.weights)
        if not (ws.finetune / "predictions.parquet").exists():
            run_finetune(FinetuneConfig(backbone=name, train=_train(args, seed, args.epochs)), _data(args, target), ws)
        rows = pd.read_parquet(ws.finetune / "predictions.parquet")
        rows = rows[rows["hospital"] == target]
        measured[name] = binary_metrics(rows["label"].to_numpy(), rows["prob"].to_numpy(), n_bootstrap=0)["auc"][
            "value"]
    ws = workspace(root / f"select_{target}", manifest)
    _link(ws, "weights", pool.weights)
    rankings = {}
    for mode, aware in (("source_only", False), ("target_aware", True)):
        result = run_select(SelectConfig(candidates=list(CANDIDATES), target_aware=aware), _data(args, target), ws)
        # the ranking's own order as scores (higher = better), so τ compares orders, not score scales
        scores = {row["backbone"]: -float(row["rank"]) for row in result["ranking"]}
        rankings[mode] = {"order": [row["backbone"] for row in sorted(result["ranking"], key=lambda r: r["rank"])],
                          "agreement": ranking_agreement(scores, measured)}
    return {"measured_target_auc": measured, "rankings": rankings}


def run_seed(seed: int, data: np.lib.npyio.NpzFile, args: argparse.Namespace) -> dict:
    root = args.out / f"seed{seed}"
    done = root / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    labeled = write_arrays(_hospitals(seed, data), root / "arrays")
    manifest = unlabeled_targets(labeled)
    result: dict = {"seed": seed, "deployment": {}, "selection": {}}
    for target in TARGETS:
        t0 = time.perf_counter()
        result["deployment"][target.name] = deployment(root, manifest, labeled, target.name, seed, args)
        result["selection"][target.name] = selection(root, manifest, target.name, seed, args)
        log.info("seed %d %s: %.0f s", seed, target.name, time.perf_counter() - t0)
    done.write_text(json.dumps(result))
    return result


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    targets = [t.name for t in TARGETS]
    lines = [f"Seeds {[r['seed'] for r in results]}; image size {args.size}; fine-tuning {args.epochs} epochs, "
             f"adaptation {args.adapt_epochs}, SSL {args.ssl_epochs}; intervals 95 % ({args.n_bootstrap} patient "
             "resamples).", ""]
    lines += ["**Prevalence estimated without labels** (the target from its unlabeled images, each other hospital "
              "from its test images), per seed: estimate [interval] / truth", "",
              "| deployed to | hospital | role | BBSE | EM | true |", "|---|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {"bbse": [], "em": []}
    for r in results:
        for target in targets:
            for hospital, site in r["deployment"][target]["sites"].items():
                cells = []
                for method in ("bbse", "em"):
                    e = site["prevalence"][method]
                    if e.get("prevalence") is None:
                        cells.append("n/a")
                        continue
                    cells.append(f"{e['prevalence']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]")
                    if site["role"] == "target":
                        errors[method].append(abs(e["prevalence"] - site["true_prevalence"]))
                if site["role"] == "target" or r is results[0]:
                    lines.append(f"| {target} (seed {r['seed']}) | {hospital} | {site['role']} | {cells[0]} | "
                                 f"{cells[1]} | {site['true_prevalence']:.3f} |")
    lines += ["", "Mean absolute error of the target's prevalence: " + ", ".join(
        f"{m} {np.mean(v):.3f} (max {np.max(v):.3f}, {len(v)} deployments)" for m, v in errors.items() if v), ""]
    lines += ["**Deployed model's AUC estimated without labels** vs measured on the test images:", "",
              "| deployed to | hospital | role | measured AUC | ATC | agreement |", "|---|---|---|---|---|---|"]
    auc_errors: dict[tuple[str, str], list[float]] = {}
    undefined: dict[tuple[str, str], int] = {}
    for r in results:
        for target in targets:
            for hospital, site in r["deployment"][target]["sites"].items():
                cells = []
                for method in ("atc", "agreement"):
                    e = site["estimates"].get(method)
                    if e is None:
                        cells.append("—")
                        continue
                    a = e["auc"]
                    key = (method, "target" if site["role"] == "target" else "other")
                    if a["value"] is None:  # no stand-in label mass, or ATC out of its temperature reach
                        cells.append("n/a")
                        undefined[key] = undefined.get(key, 0) + 1
                        continue
                    interval = ("no interval" if a["ci_low"] is None or a["ci_high"] is None
                                else f"{a['ci_low']:.3f}, {a['ci_high']:.3f}")
                    cells.append(f"{a['value']:.3f} [{interval}]")
                    auc_errors.setdefault(key, []).append(abs(a["value"] - site["measured_auc"]))
                lines.append(f"| {target} (seed {r['seed']}) | {hospital} | {site['role']} | "
                             f"{site['measured_auc']:.3f} | {cells[0]} | {cells[1]} |")
    lines += ["", "Mean absolute error of the estimated AUC (target ≤ 0.05): " + "; ".join(
        f"{method} at {where} hospitals {np.mean(v):.3f} (max {np.max(v):.3f}, n = {len(v)}"
        + (f"; {undefined[(method, where)]} without an estimate" if undefined.get((method, where)) else "") + ")"
        for (method, where), v in sorted(auc_errors.items())), ""]
    lines += ["**Backbone selection against the measured target AUC** (each candidate fine-tuned on the source, "
              "tested on the target): Kendall τ / weighted τ / regret, per seed", "",
              "| target | seed | measured target AUC | source-only order | τ, τ_w, regret | target-aware order | "
              "τ, τ_w, regret |", "|---|---|---|---|---|---|---|"]
    taus: dict[str, list[float]] = {"source_only": [], "target_aware": []}
    for target in targets:
        for r in results:
            s = r["selection"][target]
            measured = ", ".join(f"{k.split('.')[0].replace('efficientnet_lite0', 'lite0')}."
                                 f"{k.split('.')[1]} {v:.3f}" for k, v in s["measured_target_auc"].items())
            cells = []
            for mode in ("source_only", "target_aware"):
                a = s["rankings"][mode]["agreement"]
                taus[mode].append(a["kendall_tau"])
                cells += [" > ".join(s["rankings"][mode]["order"]),
                          f"{a['kendall_tau']:.2f}, {a['weighted_tau']:.2f}, {a['regret']:.3f}"]
            lines.append(f"| {target} | {r['seed']} | {measured} | " + " | ".join(cells) + " |")
    lines += ["", "Mean Kendall τ against the measured target AUC: " + ", ".join(
        f"{mode} {np.mean(v):.2f}" for mode, v in taus.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_new_hospital")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--adapt-epochs", type=int, default=3)
    parser.add_argument("--ssl-epochs", type=int, default=3)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch each: a smoke run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: this benchmark needs ../shared/data/pneumoniamnist_28.npz")
    if args.quick:
        args.seeds, args.epochs, args.adapt_epochs, args.ssl_epochs, args.n_bootstrap = args.seeds[:1], 1, 1, 1, 100
        args.out = args.out.with_name(args.out.name + "_quick")
    data = np.load(args.data)
    results = [run_seed(seed, data, args) for seed in args.seeds]
    text = summarise(results, args)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
