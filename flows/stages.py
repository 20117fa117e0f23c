"""One Prefect flow per stage. Each task calls exactly one ``medtl.stages`` function.

Every flow takes either a loaded ``config`` or a ``config_path`` (a YAML file under ``configs/``, relative to
the working directory) plus ``overrides`` merged into it (e.g. ``{"workdir": "runs/nightly"}``): the first is
how the pipeline flow calls them, the second how deployments (``prefect.yaml``) do.

Tasks are cached by content (``flows/caching.py``): a stage whose config section and input files are unchanged
is not run again. Ingestion (and PACS pulls) retry with exponential backoff. Ingestion can fan out in shards and
evaluation per site, over the task runner ``orchestration.task_runner`` names (threads or Dask,
``flows/runners.py``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

# medtl logs through the standard "medtl" logger; have Prefect capture it into run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "medtl")
# Hospital clusters are often offline; the local server's telemetry would only log connection errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402

from flows.artifacts import (ADAPT_KEY, FINETUNE_KEY, LOHO_KEY, SELECT_KEY, SITES_KEY,  # noqa: E402
                             adaptation_rows, finetune_description, finetune_rows, loho_rows, publish_table,
                             ranking_rows, site_rows)
from flows.caching import cached  # noqa: E402
from flows.runners import task_runner  # noqa: E402
from medtl import deploy, stages  # noqa: E402
from medtl.config import PipelineConfig, load_config  # noqa: E402
from medtl.workspace import Workspace  # noqa: E402

# Prefect's logging setup leaves the root logger at WARNING; medtl's per-epoch and per-stage lines are INFO.
logging.getLogger("medtl").setLevel(logging.INFO)


def resolve_config(config: PipelineConfig | None, config_path: str | None,
                   overrides: dict | None = None) -> PipelineConfig:
    """The run's config from a flow's parameters, with its paths made absolute.

    Absolute paths keep the workspace the same for tasks that run in another working directory (Dask workers,
    a process worker's flow-run subprocess) and in the cache keys.

    Args:
        config: a loaded config (the pipeline passes it to the stage flows); excludes ``config_path``.
        config_path: YAML file to load (deployments pass it).
        overrides: merged into the YAML before validation, e.g. ``{"workdir": "runs/nightly"}``.

    Returns:
        The validated config.

    Raises:
        ValueError: when neither or both of ``config`` and ``config_path`` are given, or ``overrides`` comes
            with ``config``.
        medtl.config.ConfigError: for a YAML file that does not validate.
    """
    if (config is None) == (config_path is None):
        raise ValueError("pass exactly one of config (a loaded PipelineConfig) and config_path (a YAML file such "
                         "as configs/demo.yaml)")
    if config is None:
        config = load_config(config_path, overrides)
    elif overrides:
        raise ValueError("overrides apply to config_path; change the loaded config itself instead")
    ingest, orchestration = config.ingest, config.orchestration
    absolute = {"workdir": Path(config.workdir).resolve()}
    absolute["ingest"] = ingest.model_copy(update={
        "input_dir": Path(ingest.input_dir).resolve() if ingest.input_dir is not None else None,
        "labels_csv": Path(ingest.labels_csv).resolve() if ingest.labels_csv is not None else None})
    absolute["orchestration"] = orchestration.model_copy(update={
        "result_storage": (Path(orchestration.result_storage).resolve()
                           if orchestration.result_storage is not None else None)})
    return config.model_copy(update=absolute)


def _ws(config: PipelineConfig) -> Workspace:
    return Workspace(config.workdir)


# --------------------------------------------------------------------------------------------------- tasks


@task(name="synth")
def synth_task(config: PipelineConfig) -> dict:
    return stages.run_synth(config.synth, _ws(config))


@task(name="ingest")
def ingest_task(config: PipelineConfig) -> dict:
    return stages.run_ingest(config.ingest, _ws(config))


@task(name="ingest-plan")
def ingest_plan_task(config: PipelineConfig, shards: int) -> dict:
    return stages.run_ingest_plan(config.ingest, _ws(config), shards)


@task(name="ingest-shard", task_run_name="ingest-shard-{shard}")
def ingest_shard_task(config: PipelineConfig, shard: int) -> dict:
    return stages.run_ingest_shard(config.ingest, _ws(config), shard)


@task(name="ingest-merge")
def ingest_merge_task(config: PipelineConfig) -> dict:
    return stages.run_ingest_merge(config.ingest, _ws(config))


@task(name="pretrain")
def pretrain_task(config: PipelineConfig) -> dict:
    return stages.run_pretrain(config.pretrain, config.data, _ws(config))


@task(name="select")
def select_task(config: PipelineConfig) -> dict:
    return stages.run_select(config.select, config.data, _ws(config))


@task(name="finetune")
def finetune_task(config: PipelineConfig) -> dict:
    return stages.run_finetune(config.finetune, config.data, _ws(config))


@task(name="loho")
def loho_task(config: PipelineConfig) -> dict:
    return stages.run_leave_one_hospital_out(config.finetune, config.data, _ws(config), config.report.n_bootstrap,
                                             config.report.confidence)


@task(name="adapt")
def adapt_task(config: PipelineConfig) -> dict:
    return stages.run_adapt(config.adapt, config.data, _ws(config))


@task(name="deploy")
def deploy_task(config: PipelineConfig) -> dict:
    return deploy.run_deploy(config, _ws(config))


@task(name="evaluation-sites")
def evaluation_sites_task(config: PipelineConfig) -> list[str]:
    return stages.evaluation_sites(_ws(config))


@task(name="evaluate-site", task_run_name="evaluate-{hospital}")
def evaluate_site_task(config: PipelineConfig, hospital: str) -> dict:
    return stages.run_evaluate_site(config.report, _ws(config), hospital)


@task(name="report")
def report_task(config: PipelineConfig) -> dict:
    return stages.run_report(config, _ws(config))


# --------------------------------------------------------------------------------------------------- flows


@flow(name="medtl-synth")
def synth_flow(config: PipelineConfig | None = None, config_path: str | None = None,
               overrides: dict | None = None) -> dict:
    """Write the synthetic multi-hospital cohort (``synth`` section) to ``<workdir>/dicom``."""
    config = resolve_config(config, config_path, overrides)
    return cached(synth_task, "synth", config, io=True)(config)


@flow(name="medtl-ingest")
def ingest_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                overrides: dict | None = None, dask_address: str | None = None) -> dict:
    """Ingest the DICOM folder (or PACS pull): in one task, or in ``orchestration.ingest_shards`` shards over the
    task runner (2D only), with the same manifest either way.

    Args:
        dask_address: a Dask scheduler to fan out on instead of ``orchestration.dask_address`` (the pipeline's
            shared cluster).
    """
    config = resolve_config(config, config_path, overrides)
    if config.orchestration.ingest_shards <= 1 or config.ingest.spatial_dims != 2:
        return cached(ingest_task, "ingest", config, io=True)(config)
    runner = task_runner(config.orchestration, dask_address)
    return ingest_shards_flow.with_options(task_runner=runner)(config=config)


@flow(name="medtl-ingest-shards")
def ingest_shards_flow(config: PipelineConfig) -> dict:
    """Plan, ingest each shard as its own task on the flow's task runner, and merge into one manifest."""
    plan = cached(ingest_plan_task, "ingest", config, io=True)(config, config.orchestration.ingest_shards)
    shard_task = cached(ingest_shard_task, "ingest", config, io=True)
    futures = [shard_task.submit(config, shard) for shard in range(len(plan["shards"]))]
    for future in futures:
        future.result()  # raises the first shard's failure, after its retries
    return cached(ingest_merge_task, "ingest", config, io=True)(config)


@flow(name="medtl-pretrain")
def pretrain_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                  overrides: dict | None = None) -> dict:
    """Self-supervised pretraining; exports ``<arch>.ssl`` into ``<workdir>/weights``."""
    config = resolve_config(config, config_path, overrides)
    return cached(pretrain_task, "pretrain", config)(config)


@flow(name="medtl-select")
def select_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                overrides: dict | None = None) -> dict:
    """Rank the candidate backbones; publishes the ranking as a table artifact."""
    config = resolve_config(config, config_path, overrides)
    result = cached(select_task, "select", config)(config)
    publish_table(SELECT_KEY, ranking_rows(result),
                  f"medtl backbone selection: ranked by {result.get('rank_by')}, best {result.get('best')} "
                  f"({result.get('n_images')} source images)")
    return result


@flow(name="medtl-finetune")
def finetune_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                  overrides: dict | None = None) -> dict:
    """Fine-tune the chosen backbone; publishes its per-epoch history as a table artifact."""
    config = resolve_config(config, config_path, overrides)
    result = cached(finetune_task, "finetune", config)(config)
    card = json.loads((_ws(config).finetune / "model.json").read_text())  # the result leaves out the history
    publish_table(FINETUNE_KEY, finetune_rows(card), f"medtl fine-tuning: {finetune_description(card)}")
    return result


@flow(name="medtl-loho")
def loho_flow(config: PipelineConfig | None = None, config_path: str | None = None,
              overrides: dict | None = None) -> dict:
    """Leave-one-hospital-out: for each labeled hospital, fine-tune on the others and test on it (the
    domain-generalisation baseline the report shows); one fine-tuning per labeled hospital. Publishes the
    held-out AUCs as a table artifact.

    Runs whenever called; the pipeline calls it only with ``report.leave_one_hospital_out``.

    Returns:
        ``loho/summary.json``'s content: ``{"backbone", "strategy", "held_out": {hospital: {...}}}``.
    """
    config = resolve_config(config, config_path, overrides)
    result = cached(loho_task, "loho", config)(config)
    publish_table(LOHO_KEY, loho_rows(result),
                  f"medtl leave-one-hospital-out: {result.get('backbone')} ({result.get('strategy')}) trained on all "
                  "hospitals but one and tested on the one left out (95 % patient-level bootstrap CIs)")
    return result


@flow(name="medtl-adapt")
def adapt_flow(config: PipelineConfig | None = None, config_path: str | None = None,
               overrides: dict | None = None) -> dict:
    """Adapt to the target hospital with every configured method and choose one without target labels."""
    config = resolve_config(config, config_path, overrides)
    return cached(adapt_task, "adapt", config)(config)


@flow(name="medtl-deploy")
def deploy_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                overrides: dict | None = None) -> dict:
    """Name the deployed model (adapt's label-free pick, else the fine-tuned model), set its operating point on the
    source validation split and estimate the target's prevalence and expected performance without its labels."""
    config = resolve_config(config, config_path, overrides)
    return cached(deploy_task, "deploy", config)(config)


@flow(name="medtl-evaluate")
def evaluate_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                  overrides: dict | None = None, dask_address: str | None = None) -> list[dict]:
    """The deployed model's metrics per hospital, one task per site on the task runner; publishes them as a
    table artifact.

    Args:
        dask_address: a Dask scheduler to fan out on instead of ``orchestration.dask_address``.
    """
    config = resolve_config(config, config_path, overrides)
    runner = task_runner(config.orchestration, dask_address)
    results = evaluate_sites_flow.with_options(task_runner=runner)(config=config)
    publish_table(SITES_KEY, site_rows(results),
                  f"medtl per-site metrics of the deployed model ({config.report.confidence:.0%} patient-level "
                  f"bootstrap CIs, {config.report.n_bootstrap} resamples)")
    return results


@flow(name="medtl-evaluate-sites")
def evaluate_sites_flow(config: PipelineConfig) -> list[dict]:
    """One evaluation task per hospital on the flow's task runner."""
    sites = cached(evaluation_sites_task, "evaluate", config)(config)
    site_task = cached(evaluate_site_task, "evaluate", config)
    futures = [site_task.submit(config, hospital) for hospital in sites]
    return [future.result() for future in futures]


@flow(name="medtl-report")
def report_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                overrides: dict | None = None) -> dict:
    """Writes the report and publishes it as Prefect artifacts (link + markdown summary, adaptation table)."""
    config = resolve_config(config, config_path, overrides)
    result = cached(report_task, "report", config)(config)
    create_markdown_artifact(key="medtl-validation-report", markdown=result["summary_markdown"],
                             description="medtl validation report: headline metrics")
    create_link_artifact(key="medtl-validation-report-html", link=f"file://{result['html']}",
                         link_text="full HTML validation report")
    report = json.loads(Path(result["json"]).read_text())
    rows = adaptation_rows(report)
    if rows:
        publish_table(ADAPT_KEY, rows,
                      f"medtl adaptation to {report['adaptation']['target_hospital']}: the deployed model and each "
                      "method's target AUC with bootstrap CIs and the difference to source-only (target labels used "
                      "for measuring only; the upper bound is chosen with them)")
    return result
