"""Experiment tracking with MLflow: one run per pipeline run, a nested run per stage.

A pipeline run (:func:`pipeline_run`, which :func:`medtl.stages.run_pipeline` opens) is the MLflow run of the
whole configuration: every config value as a parameter (secrets left out) and the resolved ``config.yaml`` as
an artifact. While it is open, each stage function decorated with :func:`stage` gets a nested run holding

* parameters: the stage's own config section (and ``data`` where the stage takes it);
* metrics: every numeric log of every ``fit`` epoch (step = epoch, counted on across LP-FT's two phases; a
  resumed ``fit`` logs the epochs it took back from its checkpoint too), from :func:`epoch_callbacks`; the
  numbers of the summary the stage returns, under ``summary.``; and what the stage logs with :func:`log_metrics`;
* artifacts: the stage's weights (``model/``, :func:`log_model`), cards, rankings and the report
  (:func:`log_artifacts`).

With ``tracking.backend: none``, or when no pipeline run is open (a stage called on its own), every function
here does nothing and MLflow is never imported. MLflow (``mlflow-skinny``) is an optional extra:
``pip install 'medtl[tracking]'``.

The store is local by default: ``<workdir>/mlruns/mlflow.db`` (SQLite) with artifacts in
``<workdir>/mlruns/artifacts``. Read it with ``mlflow.tracking.MlflowClient(tracking_uri(...))``, or browse it
with ``mlflow ui --backend-store-uri sqlite:////<absolute workdir>/mlruns/mlflow.db`` (the UI needs the full
``mlflow`` package, not the extra's ``mlflow-skinny``).
A server is named by ``tracking.uri``; its credentials come from MLflow's environment variables.

One pipeline run is open per process at a time; a stage run is open while its stage function runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

import medtl
from medtl.config import PipelineConfig, TrackingConfig

log = logging.getLogger("medtl.tracking")

LOCAL_STORE = "mlruns"
"""Folder of the local store inside the workdir."""
STAGE_TAG = "medtl.stage"
"""Tag naming the stage of a nested run (``mlflow.parentRunId`` names its pipeline run)."""
SUMMARY = "summary"
"""Prefix of the metrics taken from a stage's returned summary (``summary.val_auc``), apart from the per-epoch
metrics of the same name (``val_auc`` at steps 1..epochs)."""

_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
_BATCH = 100  # MLflow's limit on parameters per log_batch call
_SECRET = re.compile(r"(secret|password|token)$", re.IGNORECASE)  # keys whose value must never leave the site

F = TypeVar("F", bound=Callable[..., Any])


class TrackingUnavailable(RuntimeError):
    """Tracking is enabled but MLflow cannot be imported."""


def _client_class():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise TrackingUnavailable(
            "tracking.backend is 'mlflow' but MLflow is not installed: pip install 'medtl[tracking]' (it brings "
            "mlflow-skinny), or set tracking.backend: none in the config") from exc
    return MlflowClient


def tracking_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """The MLflow tracking URI a run with ``cfg`` writes to.

    Args:
        cfg: the ``tracking`` section.
        workdir: the run's workdir (holds the local store when ``cfg.uri`` is unset).

    Returns:
        ``cfg.uri``, or ``sqlite:///<absolute workdir>/mlruns/mlflow.db``.
    """
    if cfg.uri is not None:
        return cfg.uri
    return f"sqlite:///{(Path(workdir) / LOCAL_STORE).resolve() / 'mlflow.db'}"


def flatten_params(value: Any, prefix: str = "") -> dict[str, str]:
    """MLflow parameters from a config: nested keys joined with dots, lists and scalars as JSON text.

    Keys ending in ``secret``, ``password`` or ``token`` (e.g. ``ingest.deid.uid_secret``) are left out: a
    tracking server is outside the site.

    Args:
        value: a pydantic model, a mapping or a plain value.
        prefix: the key of ``value`` itself.

    Returns:
        ``{"finetune.train.lr": "0.001", ...}``, each value at most MLflow's 6000 characters.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            if not _SECRET.search(str(key)):
                out.update(flatten_params(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:_MAX_PARAM_CHARS]}


def _redacted(value: Any) -> Any:
    """``value`` (JSON-like) without the keys :func:`flatten_params` leaves out."""
    if isinstance(value, Mapping):
        return {k: _redacted(v) for k, v in value.items() if not _SECRET.search(str(k))}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def numeric_leaves(value: Any, prefix: str = "") -> dict[str, float]:
    """The numbers in a (nested) stage summary, keyed by their dotted path; lists and booleans are skipped.

    Args:
        value: what a stage function returned.
        prefix: the key of ``value`` itself.

    Returns:
        ``{"target_auc.coral": 0.71, ...}``.
    """
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(numeric_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and prefix:
        return {prefix: float(value)}
    return {}


class Run:
    """One MLflow run (a pipeline's or a stage's), written through an ``MlflowClient``.

    Args:
        client: the client of the tracking store.
        run_id: the run's id.
        experiment_id: the id of its experiment.
        log_models: whether :func:`log_model` uploads weights.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, log_models: bool = True) -> None:
        self.client, self.run_id, self.experiment_id, self.log_models = client, run_id, experiment_id, log_models

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log parameters, in batches of MLflow's limit of 100 per call."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log metrics at ``step`` in one call (NaN is kept: an undefined AUC is still an epoch's value)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifacts(self, paths: list[str | Path], artifact_path: str) -> None:
        """Upload files into the run's ``artifact_path`` folder; missing ones are skipped with a warning."""
        for path in map(Path, paths):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
            else:
                log.warning("tracking: %s does not exist; not logged", path)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` or ``FAILED``."""
        self.client.set_terminated(self.run_id, status=status)


class EpochLogger:
    """``fit`` callback: each epoch's numeric logs become metrics of a stage run, ``prefix`` + key, step = the
    epoch's number. The step counts on across the ``fit`` calls this object is passed to (LP-FT's probe then
    fine-tune phases), matching the stage's history; a resumed ``fit`` hands over the epochs it took back from
    its checkpoint in ``on_fit_start``, and they are logged first. List it after the callbacks that add logs
    (validation), so their values are in.

    Args:
        run: the stage run.
        prefix: prepended to every key, e.g. ``"scratch/"``.
    """

    def __init__(self, run: Run, prefix: str = "") -> None:
        self.run, self.prefix, self.step = run, prefix, 0

    def on_fit_start(self, model: Any, history: list[dict]) -> None:
        for logs in history:
            self._log(logs)

    def __call__(self, epoch: int, model: Any, logs: dict) -> None:
        self._log(logs)

    def _log(self, logs: dict) -> None:
        self.step += 1
        self.run.log_metrics({f"{self.prefix}{k}": v for k, v in logs.items()
                              if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                             step=self.step)


_pipeline: Run | None = None
_stage: Run | None = None


def active_run() -> Run | None:
    """The open pipeline run, or None (tracking off, or no pipeline run open)."""
    return _pipeline


def start(config: PipelineConfig) -> Run | None:
    """Open the pipeline run for ``config`` (see :func:`pipeline_run`, which also closes it).

    Args:
        config: the whole configuration; ``config.tracking`` says where to, ``config.workdir`` names the run.

    Returns:
        The run, or None with ``tracking.backend: none``.

    Raises:
        TrackingUnavailable: tracking is on and MLflow is not installed.
        RuntimeError: a pipeline run is already open in this process.
    """
    global _pipeline
    cfg = config.tracking
    if cfg.backend == "none":
        return None
    if _pipeline is not None:
        raise RuntimeError(f"a pipeline run ({_pipeline.run_id}) is already open; call medtl.tracking.end() first")
    client_class = _client_class()
    uri = tracking_uri(cfg, config.workdir)
    artifacts = None  # a server keeps its own artifact store
    if uri.startswith("sqlite:///"):
        # without a location MLflow puts a new experiment's artifacts in ./mlruns of the current directory;
        # next to the database they stay with the run
        store = Path(uri.removeprefix("sqlite:///")).parent
        store.mkdir(parents=True, exist_ok=True)
        artifacts = (store / "artifacts").resolve().as_uri()
    client = client_class(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(cfg.experiment, artifact_location=artifacts))
    workdir = Path(config.workdir).resolve()
    run = client.create_run(experiment_id, run_name=cfg.run_name or workdir.name,
                            tags={"medtl.version": medtl.__version__, "medtl.workdir": str(workdir)})
    opened = Run(client, run.info.run_id, experiment_id, log_models=cfg.log_models)
    try:
        opened.log_params(flatten_params(config))
        client.log_dict(opened.run_id, _redacted(config.model_dump(mode="json")), "config.yaml")
    except BaseException:
        opened.end("FAILED")
        raise
    _pipeline = opened
    log.info("tracking: MLflow run %s in experiment %r at %s", run.info.run_id, cfg.experiment, uri)
    return opened


def end(status: str = "FINISHED") -> None:
    """Close the open pipeline run (nothing to do when none is open).

    Args:
        status: ``FINISHED`` or ``FAILED``.
    """
    global _pipeline
    if _pipeline is not None:
        run, _pipeline = _pipeline, None
        run.end(status)


@contextmanager
def pipeline_run(config: PipelineConfig) -> Iterator[Run | None]:
    """Open the pipeline run for the block's stages, and close it ``FINISHED`` (``FAILED`` on an exception).

    Inside an already open pipeline run (``medtl demo`` under a caller that opened one) the block joins it.

    Args:
        config: the whole configuration.

    Yields:
        The pipeline run, or None with ``tracking.backend: none``.
    """
    if _pipeline is not None:
        yield _pipeline
        return
    run = start(config)
    try:
        yield run
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


def _stage_params(name: str, arguments: Mapping[str, Any]) -> dict[str, str]:
    """Parameters of a stage run: its config arguments by parameter name (``cfg`` under the stage's name; a
    whole :class:`PipelineConfig` contributes its ``name`` section)."""
    params: dict[str, str] = {}
    for arg, value in arguments.items():
        if isinstance(value, PipelineConfig):
            section = getattr(value, name, None)
            if isinstance(section, BaseModel):
                params.update(flatten_params(section, name))
        elif isinstance(value, BaseModel):
            params.update(flatten_params(value, name if arg == "cfg" else arg))
    return params


def stage(name: str) -> Callable[[F], F]:
    """Decorator: while a pipeline run is open, the stage function runs inside a nested run named ``name``,
    with its config arguments as parameters and the numbers of its returned summary as ``summary.*`` metrics
    (a failing stage ends its run ``FAILED`` and re-raises). Without an
    open pipeline run the function runs untouched.

    Args:
        name: the stage's name (its config section, e.g. ``finetune``).

    Returns:
        The decorator.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            global _stage
            if _pipeline is None:
                return fn(*args, **kwargs)
            from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

            parent = _pipeline
            created = parent.client.create_run(parent.experiment_id, run_name=name,
                                               tags={MLFLOW_PARENT_RUN_ID: parent.run_id, STAGE_TAG: name})
            run = Run(parent.client, created.info.run_id, parent.experiment_id, log_models=parent.log_models)
            # a stage may run another inside it (the report deploys first when deploy/ is out of date): the outer
            # stage's run is open again once the inner one ends
            outer, _stage = _stage, run
            try:
                run.log_params(_stage_params(name, signature.bind(*args, **kwargs).arguments))
                result = fn(*args, **kwargs)
            except BaseException:
                run.end("FAILED")
                raise
            finally:
                _stage = outer
            run.log_metrics(numeric_leaves(result, SUMMARY))
            run.end("FINISHED")
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def epoch_callbacks(prefix: str = "") -> list[EpochLogger]:
    """``fit`` callbacks logging each epoch to the open stage run: ``[EpochLogger]``, or ``[]`` when none is open.

    Args:
        prefix: prepended to every metric key, to tell apart several trainings of one stage (``"tent/"``).
    """
    return [EpochLogger(_stage, prefix)] if _stage is not None else []


def log_metrics(metrics: Mapping[str, float], step: int = 0) -> None:
    """Log metrics to the open stage run (nothing when none is open); non-finite values are skipped."""
    if _stage is not None:
        _stage.log_metrics({k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}, step)


def log_artifacts(paths: list[str | Path], artifact_path: str) -> None:
    """Upload files (cards, rankings, the report) to the open stage run's ``artifact_path`` folder (nothing when
    none is open)."""
    if _stage is not None:
        _stage.log_artifacts(paths, artifact_path)


def log_model(weights: str | Path, *cards: str | Path) -> None:
    """Upload a stage's safetensors weights and their cards to the open stage run's ``model/`` folder; with
    ``tracking.log_models: false`` only the cards (nothing when no stage run is open)."""
    if _stage is not None:
        _stage.log_artifacts([*([weights] if _stage.log_models else []), *cards], "model")
