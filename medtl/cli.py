"""``medtl`` command line: one sub-command per stage, each taking ``--config``.

Examples:
    medtl synth --config configs/demo.yaml
    medtl demo --config configs/demo.yaml      # every stage, in-process (no Prefect)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from medtl import deploy, stages
from medtl.config import ConfigError, PipelineConfig, load_config
from medtl.workspace import Workspace

COMMANDS = {
    "synth": ("write the embedded synthetic multi-hospital DICOM cohort",
              lambda c, ws: stages.run_synth(c.synth, ws)),
    "ingest": ("DICOM folder → de-identified arrays + manifest",
               lambda c, ws: stages.run_ingest(c.ingest, ws)),
    "pretrain": ("self-supervised pretraining on the unlabeled images",
                 lambda c, ws: stages.run_pretrain(c.pretrain, c.data, ws)),
    "select": ("rank candidate backbones by transferability",
               lambda c, ws: stages.run_select(c.select, c.data, ws)),
    "finetune": ("fine-tune the chosen backbone with layer freezing",
                 lambda c, ws: stages.run_finetune(c.finetune, c.data, ws)),
    "loho": ("leave-one-hospital-out: multi-source fine-tuning tested on each unseen hospital",
             lambda c, ws: stages.run_leave_one_hospital_out(c.finetune, c.data, ws, c.report.n_bootstrap,
                                                             c.report.confidence)),
    "fewshot": ("N-way K-shot prototypical classification on the chosen backbone's embeddings, per hospital",
                lambda c, ws: stages.run_fewshot(c.fewshot, c.data, ws)),
    "adapt": ("adapt to the target hospital (source-only / AdaBN / TENT / CORAL / MMD / DANN / OT / pseudo-labels)",
              lambda c, ws: stages.run_adapt(c.adapt, c.data, ws)),
    "deploy": ("name the deployed model (adapt's pick, else the fine-tuned one), set its threshold and "
               "calibration on source validation, estimate the target's prevalence",
               lambda c, ws: deploy.run_deploy(c, ws)),
    "report": ("write the per-hospital HTML validation report of the deployed model",
               lambda c, ws: stages.run_report(c, ws)),
    "demo": ("run every stage in order on the embedded cohort",
             lambda c, ws: stages.run_pipeline(c)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
        p.add_argument("--workdir", default=None, help="override the config's workdir")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        overrides = {"workdir": args.workdir} if args.workdir else None
        config: PipelineConfig = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"medtl: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = COMMANDS[args.command][1](config, Workspace(config.workdir))
    except (OSError, ValueError, RuntimeError) as exc:  # missing inputs, bad data, an unreachable PACS: say what
        if args.verbose:
            raise
        print(f"medtl {args.command}: {type(exc).__name__}: {exc}\n(run with -v for the traceback)", file=sys.stderr)
        return 1
    printable = {k: v for k, v in (result or {}).items() if k != "summary_markdown"}
    print(json.dumps(printable, indent=2, default=str))
    if args.command in ("report", "demo"):
        print(f"Validation report: {result['html']}")
    print(f"medtl {args.command} finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
