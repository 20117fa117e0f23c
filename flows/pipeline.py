"""The whole medtl pipeline as a Prefect flow chaining the stage flows.

Run it (ephemeral local Prefect, no server to start)::

    python -m flows.pipeline --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from prefect import flow

from flows.stages import (adapt_flow, finetune_flow, ingest_flow, pretrain_flow, report_flow, select_flow,
                          synth_flow)
from medtl.config import ConfigError, PipelineConfig, load_config


@flow(name="medtl-pipeline", log_prints=True)
def pipeline(config: PipelineConfig) -> dict:
    """DICOM → ingest → SSL pretraining → backbone selection → fine-tuning → adaptation → report."""
    if config.ingest.uses_synthetic_cohort:
        print(synth_flow(config)["summary"])
    print(ingest_flow(config)["summary"])
    if f"{config.pretrain.arch}.ssl" in config.select.candidates:
        pretrain_flow(config)
    select_flow(config)
    finetune_flow(config)
    adapt_flow(config)
    return report_flow(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the medtl pipeline under Prefect")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        config = load_config(args.config, {"workdir": args.workdir} if args.workdir else None)
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
