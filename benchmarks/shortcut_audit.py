"""The acquisition-shortcut audit (:mod:`medtl.evaluate.shortcut`) on a synthetic cohort, from DICOM to the audit.

Writes the config's synthetic cohort (``synth``), ingests it (``ingest``), loads the manifest and audits it: per
hospital, how well the label is predicted from the acquisition fields alone (rows, columns, aspect ratio, pixel
spacing, bit depth, photometric interpretation, view, body part, vendor, model, sex, age), and how well the
hospital is; then the warnings the validation report would give.

Run::

    .venv/bin/python benchmarks/shortcut_audit.py --config configs/shortcut.yaml   # source hospital has a shortcut
    .venv/bin/python benchmarks/shortcut_audit.py --config configs/tiny.yaml       # no shortcut

It works in the config's ``workdir`` (or ``--workdir``); synthesis rewrites identical files and ingestion skips
files already done, so a second run only audits. The audit goes to ``<workdir>/shortcut_audit.json``. Numbers
measured with this script are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medtl.config import load_config  # noqa: E402
from medtl.evaluate.shortcut import shortcut_audit  # noqa: E402
from medtl.ingest import ingest_folder, load_manifest  # noqa: E402
from medtl.synth import write_cohort  # noqa: E402
from medtl.workspace import Workspace  # noqa: E402


def _interval(auc: dict) -> str:
    if auc["value"] is None:
        return "n/a"
    ci = f" [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" if auc["ci_low"] is not None else ""
    return f"{auc['value']:.3f}{ci}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shortcut.yaml")
    parser.add_argument("--workdir", type=Path, default=None, help="default: the config's workdir")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    overrides = {"workdir": str(args.workdir)} if args.workdir is not None else None
    cfg = load_config(args.config, overrides)
    ws = Workspace(Path(cfg.workdir))
    started = time.perf_counter()
    print(write_cohort(cfg.synth, ws.dicom))
    print(ingest_folder(cfg.ingest, ws))
    prepared = time.perf_counter()
    audit = shortcut_audit(load_manifest(ws), n_bootstrap=args.n_bootstrap, seed=args.seed)
    audited = time.perf_counter()

    print(f"\nlabel from the acquisition alone (out-of-fold AUC, patient-level {audit['confidence']:.0%} CI; "
          f"predictable from {audit['threshold']}):")
    for item in audit["label"]:
        top = ", ".join(f"{f['field']} {f['auc']:.2f}" for f in item["field_auc"][:3])
        print(f"  {item['hospital']:32s} n={item['n']:4d} AUC {_interval(item['auc'])}  "
              f"predictable={item['predictable']}  top fields: {top or item.get('reason', '')}")
    hospital = audit["hospital"]
    print(f"hospital from the acquisition alone ({hospital.get('auc_kind', '')}): AUC {_interval(hospital['auc'])}; "
          f"prevalences {hospital.get('prevalence')}, chi-square p = {hospital.get('prevalence_p_value')}; "
          f"label from the hospital alone: AUC {_interval(hospital.get('label_auc_from_hospital', hospital['auc']))}")
    print("\nwarnings:" if audit["warnings"] else "\nno warnings")
    for sentence in audit["warnings"]:
        print(f"  - {sentence}")
    out = ws.root / "shortcut_audit.json"
    out.write_text(json.dumps(audit, indent=1, ensure_ascii=False))
    print(f"\nsynth + ingest {prepared - started:.1f} s, audit {audited - prepared:.1f} s; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
