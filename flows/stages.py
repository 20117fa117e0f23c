"""One Prefect flow per stage. Each task calls exactly one ``medtl.stages`` function."""

from __future__ import annotations

import logging
import os

# medtl logs through the standard "medtl" logger; have Prefect capture it into run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "medtl")
# Hospital clusters are often offline; the local server's telemetry would only log connection errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402

from medtl import stages  # noqa: E402
from medtl.config import PipelineConfig  # noqa: E402
from medtl.workspace import Workspace  # noqa: E402

# Prefect's logging setup leaves the root logger at WARNING; medtl's per-epoch and per-stage lines are INFO.
logging.getLogger("medtl").setLevel(logging.INFO)


@task(name="synth")
def synth_task(config: PipelineConfig) -> dict:
    return stages.run_synth(config.synth, Workspace(config.workdir))


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30])
def ingest_task(config: PipelineConfig) -> dict:
    return stages.run_ingest(config.ingest, Workspace(config.workdir))


@task(name="pretrain")
def pretrain_task(config: PipelineConfig) -> dict:
    return stages.run_pretrain(config.pretrain, config.data, Workspace(config.workdir))


@task(name="select")
def select_task(config: PipelineConfig) -> dict:
    return stages.run_select(config.select, config.data, Workspace(config.workdir))


@task(name="finetune")
def finetune_task(config: PipelineConfig) -> dict:
    return stages.run_finetune(config.finetune, config.data, Workspace(config.workdir))


@task(name="adapt")
def adapt_task(config: PipelineConfig) -> dict:
    return stages.run_adapt(config.adapt, config.data, Workspace(config.workdir))


@task(name="report")
def report_task(config: PipelineConfig) -> dict:
    return stages.run_report(config, Workspace(config.workdir))


@flow(name="medtl-synth")
def synth_flow(config: PipelineConfig) -> dict:
    return synth_task(config)


@flow(name="medtl-ingest")
def ingest_flow(config: PipelineConfig) -> dict:
    return ingest_task(config)


@flow(name="medtl-pretrain")
def pretrain_flow(config: PipelineConfig) -> dict:
    return pretrain_task(config)


@flow(name="medtl-select")
def select_flow(config: PipelineConfig) -> dict:
    return select_task(config)


@flow(name="medtl-finetune")
def finetune_flow(config: PipelineConfig) -> dict:
    return finetune_task(config)


@flow(name="medtl-adapt")
def adapt_flow(config: PipelineConfig) -> dict:
    return adapt_task(config)


@flow(name="medtl-report")
def report_flow(config: PipelineConfig) -> dict:
    """Writes the report and publishes it as Prefect artifacts (link + markdown summary)."""
    result = report_task(config)
    create_markdown_artifact(key="medtl-validation-report", markdown=result["summary_markdown"],
                             description="medtl validation report: headline metrics")
    create_link_artifact(key="medtl-validation-report-html", link=f"file://{result['html']}",
                         link_text="full HTML validation report")
    return result
