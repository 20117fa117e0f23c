"""Content-addressed caching and retries for the stage tasks.

A stage task's cache key is a hash of

* the task's name, its stage and its own parameters besides ``config`` (an ingest shard's index, a hospital);
* the config sections the stage reads (JSON), single fields of other sections it reads (leave-one-hospital-out's
  bootstrap settings), the resolved workdir and the medtl version;
* the content (SHA-256) of the workspace files the stage reads: the manifest, rankings, weights, cards and
  predictions earlier stages wrote. The raw input folder of ingestion is fingerprinted by each file's path,
  size and modification time instead of its bytes (hashing a hospital's archive twice per run would cost as much
  as ingesting it), plus the labels CSV's content and a fingerprint of the de-identification key.

Never the flow run id: re-running the pipeline with nothing changed finds every stage's key and reads its result
back from the result storage (JSON files under ``orchestration.result_storage``, default
``<workdir>/.prefect-results``); changing one config field changes that stage's key, its outputs change, and so do
the keys of the stages that read them. A stage whose outputs were deleted since is re-run (``refresh_cache``), as
is every stage with ``orchestration.cache: false``. A PACS pull is never cached: the PACS may have new studies.

medtl stays Prefect-free: this module only reads the :class:`~medtl.workspace.Workspace` layout.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.tasks import Task

import medtl
from medtl.config import PipelineConfig
from medtl.ingest.folder import file_sha256, scan_inputs
from medtl.ingest.manifest import load_ledger
from medtl.workspace import Workspace

_MANIFEST = "ingest/manifest.parquet"
_LEDGER = "ingest/ledger.parquet"
_LOHO_SUMMARY = "loho/summary.json"
_DEPLOYED = ("deploy/model.safetensors", "deploy/model.json", "deploy/predictions.parquet", "deploy/analysis.json")
_RESULTS_DIR = ".prefect-results"


@dataclass(frozen=True)
class StageFiles:
    """What a stage reads and writes, for its cache key and for trusting a cached result.

    Attributes:
        sections: config sections in the key (``"*"``: the whole config but ``orchestration``).
        inputs: workspace paths (files or folders) whose content is in the key.
        outputs: workspace paths that must exist for a cached result to be used; ``{arch}`` is
            ``config.pretrain.arch``.
        fields: single fields of other sections in the key, as ``"section.field"``: a stage that reads one
            field of a section must not re-run when the rest of it changes.
    """

    sections: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()


STAGES: dict[str, StageFiles] = {
    "synth": StageFiles(("synth",), (), ("dicom",)),
    "ingest": StageFiles(("ingest",), (), (_MANIFEST, _LEDGER)),  # + the input folder, see _ingest_inputs
    "pretrain": StageFiles(("pretrain", "data"), (_MANIFEST,),
                           ("weights/{arch}.ssl.safetensors", "pretrain/card.json")),
    "select": StageFiles(("select", "data"), (_MANIFEST, "weights"), ("select/ranking.json",)),
    "finetune": StageFiles(("finetune", "data"), (_MANIFEST, "select/ranking.json", "weights"),
                           ("finetune/model.json", "finetune/model.safetensors", "finetune/predictions.parquet")),
    # leave-one-hospital-out trains its own models from the chosen backbone, never reads the fine-tuned one; of the
    # report section it reads only the bootstrap settings (a new report title must not cost a fine-tuning per hospital)
    "loho": StageFiles(("finetune", "data"), (_MANIFEST, "select/ranking.json", "weights"),
                       ("loho/summary.json", "loho/predictions.parquet"),
                       fields=("report.n_bootstrap", "report.confidence")),
    "adapt": StageFiles(("adapt", "data"), (_MANIFEST, "finetune/model.json", "finetune/model.safetensors", "weights"),
                        ("adapt/summary.json", "adapt/predictions.parquet", "adapt/chosen.safetensors")),
    # the deployed model: adapt's pick (or the fine-tuned model), its operating point and label-free analyses
    "deploy": StageFiles(("data",), (_MANIFEST, "finetune/model.json", "finetune/model.safetensors",
                                     "adapt/selection.json", "adapt/chosen.safetensors",
                                     "adapt/target_probabilities.safetensors"), _DEPLOYED,
                         fields=("report.recalibrate", "report.n_bootstrap", "report.confidence", "adapt.label_shift")),
    "evaluate": StageFiles(("report",), ("deploy/predictions.parquet", "deploy/model.json"), ("evaluate",)),
    "report": StageFiles(("*",), (_MANIFEST, _LEDGER, "pretrain/card.json", "select/ranking.json",
                                  "finetune/model.json", "finetune/predictions.parquet", "adapt/summary.json",
                                  "adapt/selection.json", "adapt/predictions.parquet", *_DEPLOYED,
                                  _LOHO_SUMMARY),  # the report shows leave-one-hospital-out whenever it is there
                         ("report/report.html", "report/report.json")),
}


def result_storage(config: PipelineConfig) -> Path:
    """Folder of the persisted task results and cache records of a run.

    Args:
        config: the run's config.

    Returns:
        ``orchestration.result_storage``, else ``<workdir>/.prefect-results``, as an absolute path.
    """
    folder = config.orchestration.result_storage or Path(config.workdir) / _RESULTS_DIR
    return Path(folder).resolve()


def stage_cache_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect ``cache_key_fn`` for the tasks of ``stage`` (a key of :data:`STAGES`).

    Args:
        stage: the stage whose config sections and input files make the key.

    Returns:
        ``fn(context, parameters)``; ``parameters`` must hold the task's ``config``. It returns None (no
        caching) for an ingest that pulls from a PACS.

    Raises:
        ValueError: for an unknown stage.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGES)}")

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        return cache_key(stage, context.task.name, parameters)

    key.__name__ = f"{stage}_cache_key"
    return key


def cache_key(stage: str, task_name: str, parameters: dict[str, Any]) -> str | None:
    """The cache key of one call of a stage task (see the module docstring for what goes in).

    Args:
        stage: a key of :data:`STAGES`.
        task_name: the task's name (tells apart the tasks of one stage, e.g. an ingest shard from the merge).
        parameters: the call's parameters, with ``config`` a :class:`PipelineConfig`.

    Returns:
        64 hex digits, or None when the stage must not be cached (an ingest from a PACS).
    """
    config = parameters["config"]
    if not isinstance(config, PipelineConfig):
        raise TypeError(f"the {task_name} task's config parameter is a {type(config).__name__}, not a "
                        "PipelineConfig; pass the loaded config")
    if stage == "ingest" and config.ingest.pacs is not None:
        return None
    spec = STAGES[stage]
    ws = Workspace(config.workdir)
    if spec.sections == ("*",):
        sections = config.model_dump(mode="json", exclude={"orchestration"})
    else:
        sections = {name: getattr(config, name).model_dump(mode="json") for name in spec.sections}
    for dotted in spec.fields:
        section, field = dotted.split(".", 1)
        sections[dotted] = getattr(getattr(config, section), field)
    inputs = {rel: _fingerprint(ws.root / rel) for rel in spec.inputs}
    if stage == "ingest":
        inputs.update(_ingest_inputs(config, ws))
    others = {name: value for name, value in parameters.items() if name != "config"}
    payload = {"task": task_name, "stage": stage, "medtl": medtl.__version__,
               "workdir": str(ws.root.resolve()), "config": sections, "inputs": inputs, "parameters": others}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def outputs_present(stage: str, config: PipelineConfig) -> bool:
    """Whether the outputs a cached result of ``stage`` stands for are in the workspace.

    Args:
        stage: a key of :data:`STAGES`.
        config: the run's config.

    Returns:
        False when any declared output is missing (an empty folder counts as missing), and for ingestion while its
        ledger holds files to retry (a resource limit stopped them: the cached run did not finish them).
    """
    ws = Workspace(config.workdir)
    root = ws.root
    for rel in STAGES[stage].outputs:
        path = root / rel.format(arch=config.pretrain.arch)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return False
    if stage == "ingest":
        return not (load_ledger(ws)["status"] == "retry").any()
    return True


def cached(task: Task, stage: str, config: PipelineConfig, *, io: bool = False) -> Task:
    """``task`` with this run's caching, result storage and (for I/O) retries.

    Args:
        task: a stage task whose parameters include ``config``.
        stage: a key of :data:`STAGES` (the key's sections and inputs, the outputs checked).
        config: the run's config (``orchestration`` says whether to cache, where, and how to retry).
        io: retry with exponential backoff (``orchestration.retries``, ``retry_delay_s`` doubling each time):
            reading files from shared storage and PACS pulls fail transiently.

    Returns:
        A copy of the task with the options set.
    """
    orchestration = config.orchestration
    options: dict[str, Any] = {}
    if io and orchestration.retries:
        options.update(retries=orchestration.retries,
                       retry_delay_seconds=[orchestration.retry_delay_s * 2 ** i for i in range(orchestration.retries)],
                       retry_jitter_factor=0.2)
    if not orchestration.cache:
        return task.with_options(cache_policy=NO_CACHE, persist_result=False, **options)
    return task.with_options(cache_key_fn=stage_cache_key(stage), persist_result=True,
                             result_storage=result_storage(config), result_serializer="json",
                             refresh_cache=not outputs_present(stage, config), **options)


# ------------------------------------------------------------------------------------------------ fingerprints


def _fingerprint(path: Path) -> str | dict[str, str]:
    """Content hash of a file, or of every file under a folder (by relative path); ``"missing"`` if absent."""
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*"))
                if p.is_file() and not p.name.startswith(".")}  # hidden: partial writes, not outputs
    return "missing"


def _ingest_inputs(config: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """The input folder by (path, size, mtime) of each file, the labels CSV by content, the key by a hash."""
    from medtl.ingest.deid import resolve_secret

    cfg = config.ingest
    folder = Path(cfg.input_dir) if cfg.input_dir is not None else ws.dicom
    labels = Path(cfg.labels_csv) if cfg.labels_csv is not None else folder / "labels.csv"
    listing: list[tuple] = []
    if folder.is_dir():  # every entry ingestion itself would account for: its files and what it skips, with why
        files, skipped = scan_inputs(folder, skip=[labels, ws.ingest])
        for rel, path in files:
            stat = path.stat()
            listing.append((rel, stat.st_size, stat.st_mtime_ns))
        listing += skipped
    with warnings.catch_warnings():  # ingestion itself warns about a missing key, once
        warnings.simplefilter("ignore")
        key = resolve_secret(cfg.deid)
    return {"input_folder": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "labels_csv": _fingerprint(labels),
            "deid_key": hashlib.sha256(b"medtl cache key check\0" + key).hexdigest()}
