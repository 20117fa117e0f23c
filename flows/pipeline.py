"""The whole medtl pipeline as a Prefect flow chaining the stage flows.

Run it (ephemeral local Prefect, no server to start)::

    python -m flows.pipeline --config configs/demo.yaml

or deploy it, with one deployment per stage, from ``prefect.yaml`` (docs/deploy.md). A re-run with nothing
changed skips every finished stage (content-addressed cache, ``flows/caching.py``); ``--no-cache`` runs them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from prefect import flow

from flows.runners import shared_cluster
from flows.stages import (adapt_flow, evaluate_flow, finetune_flow, ingest_flow, loho_flow, pretrain_flow,
                          report_flow, resolve_config, select_flow, synth_flow)
from medtl import tracking
from medtl.config import ConfigError, PipelineConfig


@flow(name="medtl-pipeline", log_prints=True)
def pipeline(config: PipelineConfig | None = None, config_path: str | None = None,
             overrides: dict | None = None) -> dict:
    """DICOM → ingest → SSL pretraining → backbone selection → fine-tuning (→ leave-one-hospital-out) →
    adaptation → per-site evaluation → report.

    Args:
        config: a loaded config; or
        config_path: a YAML file (e.g. ``configs/demo.yaml``, relative to the working directory), with
        overrides: merged into it (e.g. ``{"workdir": "runs/nightly"}``).

    Returns:
        The report stage's result (``html``, ``json``, ``pdf`` paths and the markdown summary).
    """
    config = resolve_config(config, config_path, overrides)
    # one MLflow run for the whole pipeline (tracking.backend), with a nested run per stage that executes: a stage
    # served from the Prefect cache did no work and logs none. One Dask cluster for both fan-out stages (none
    # unless orchestration.task_runner is dask without an address).
    with tracking.pipeline_run(config), shared_cluster(config.orchestration) as dask_address:
        if config.ingest.uses_synthetic_cohort:
            print(synth_flow(config=config)["summary"])
        print(ingest_flow(config=config, dask_address=dask_address)["summary"])
        if f"{config.pretrain.arch}.ssl" in config.select.candidates:
            pretrain_flow(config=config)
        select_flow(config=config)
        finetune_flow(config=config)
        # opt-in: one extra fine-tuning per labeled hospital, for the report's domain-generalisation baseline
        if config.report.leave_one_hospital_out:
            loho_flow(config=config)
        adapt_flow(config=config)
        evaluate_flow(config=config, dask_address=dask_address)
        return report_flow(config=config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the medtl pipeline under Prefect")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-cache", action="store_true", help="run every stage even if its inputs are unchanged")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    overrides: dict = {"workdir": args.workdir} if args.workdir else {}
    if args.no_cache:
        overrides["orchestration"] = {"cache": False}
    try:
        config = resolve_config(None, args.config, overrides or None)
    except ConfigError as exc:
        print(f"medtl: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = pipeline(config=config)
    print(f"\nPipeline finished in {time.perf_counter() - start:.0f} s")
    print(f"Validation report: {result['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
