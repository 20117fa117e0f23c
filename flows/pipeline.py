"""The whole medtl pipeline as a Prefect flow chaining the stage flows.

Run it (ephemeral local Prefect, no server to start)::

    python -m flows.pipeline --config configs/demo.yaml

or deploy it, with one deployment per stage, from ``prefect.yaml`` (docs/deploy.md). A re-run with nothing
changed skips every finished stage (content-addressed cache, ``flows/caching.py``); ``--no-cache`` runs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

from prefect import flow
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.runners import shared_cluster
from flows.stages import (adapt_flow, deploy_flow, evaluate_flow, finetune_flow, ingest_flow, loho_flow,
                          pretrain_flow, report_flow, resolve_config, select_flow, synth_flow)
from medtl import tracking
from medtl.config import ConfigError, PipelineConfig


@flow(name="medtl-pipeline", log_prints=True)
def pipeline(config: PipelineConfig | None = None, config_path: str | None = None,
             overrides: dict | None = None) -> dict:
    """DICOM → ingest → SSL pretraining → backbone selection → fine-tuning (→ leave-one-hospital-out) →
    adaptation (when a target hospital is set) → deployment → per-site evaluation of the deployed model → report.

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
        if config.data.target_hospital is not None:  # a single-hospital study has no hospital to adapt to
            adapt_flow(config=config)
        deploy_flow(config=config)
        evaluate_flow(config=config, dask_address=dask_address)
        return report_flow(config=config)


STARTUP_TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API server"


@contextlib.contextmanager
def prefect_settings(config: PipelineConfig) -> Iterator[None]:
    """Prefect settings for a pipeline run: the ephemeral server's startup timeout from
    ``orchestration.ephemeral_startup_timeout_s``, unless the environment sets it."""
    if os.environ.get(STARTUP_TIMEOUT_VARIABLE):
        yield
        return
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:
                                     config.orchestration.ephemeral_startup_timeout_s}):
        yield


def prefect_startup_timeout() -> int:
    """The ephemeral server's startup timeout in force, in seconds."""
    return int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


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
    timeout = None
    try:
        with prefect_settings(config):
            timeout = prefect_startup_timeout()
            result = pipeline(config=config)
    except RuntimeError as exc:
        if EPHEMERAL_TIMEOUT_MESSAGE not in str(exc):
            raise
        print(f"medtl: {EPHEMERAL_TIMEOUT_MESSAGE} ({timeout} s). The machine is probably busy: "
              f"raise orchestration.ephemeral_startup_timeout_s in the config or set {STARTUP_TIMEOUT_VARIABLE} "
              "(seconds), or run against a Prefect server (PREFECT_API_URL) instead of the ephemeral one.",
              file=sys.stderr)
        return 1
    print(f"\nPipeline finished in {time.perf_counter() - start:.0f} s")
    print(f"Validation report: {result['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
