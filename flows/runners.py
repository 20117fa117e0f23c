"""The task runner the fan-out flows (ingest shards, per-site evaluation) use: Prefect's thread pool, or Dask.

With ``orchestration.task_runner: dask`` the tasks go to prefect-dask's ``DaskTaskRunner``: on the cluster at
``orchestration.dask_address`` (one started by dask-jobqueue on Slurm, by dask-kubernetes, or ``dask scheduler``
by hand; see docs/deploy.md), else on a ``LocalCluster`` of ``dask_workers`` processes on loopback. Workers need
the workspace at the same path (a shared file system) and, for ingestion, the same ``$MEDTL_UID_SECRET``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from medtl.config import OrchestrationConfig

if TYPE_CHECKING:  # distributed is imported only when Dask is used
    from distributed import LocalCluster

# Ingestion parses each file in sandboxed child processes; a daemonic Dask worker process may not start any.
DASK_SETTINGS = {"distributed.worker.daemon": False}


def local_cluster_kwargs(n_workers: int) -> dict:
    """``LocalCluster`` arguments for ``n_workers`` single-threaded worker processes on loopback, no dashboard.

    Args:
        n_workers: worker processes (>= 1).

    Returns:
        Keyword arguments for :class:`distributed.LocalCluster`.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    # one thread per worker: each stage function already parallelises inside (torch threads, ingest workers)
    return {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
            "dashboard_address": None}


@contextmanager
def dask_settings() -> Iterator[None]:
    """Dask configuration under which medtl's tasks can run on local Dask workers (non-daemonic processes)."""
    import dask

    with dask.config.set(DASK_SETTINGS):
        yield


def task_runner(orchestration: OrchestrationConfig, address: str | None = None) -> TaskRunner:
    """The task runner for a fan-out flow.

    Args:
        orchestration: the config's ``orchestration`` section.
        address: a running Dask scheduler to use instead of ``orchestration.dask_address`` (the pipeline starts one
            ``LocalCluster`` for all of its flows and passes it here).

    Returns:
        A ``ThreadPoolTaskRunner`` (``task_runner: thread``) or a ``DaskTaskRunner``.
    """
    if orchestration.task_runner == "thread":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    address = address or orchestration.dask_address
    if address is not None:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=local_cluster_kwargs(orchestration.dask_workers))


def local_cluster(**kwargs: object) -> LocalCluster:
    """A ``LocalCluster`` whose workers may start processes (see :data:`DASK_SETTINGS`).

    Args:
        kwargs: :class:`distributed.LocalCluster` arguments, e.g. :func:`local_cluster_kwargs`.

    Returns:
        The started cluster (a context manager: leaving it stops the workers).
    """
    from distributed import LocalCluster

    with dask_settings():  # read when the workers start, i.e. inside the constructor
        return LocalCluster(**kwargs)


@contextmanager
def shared_cluster(orchestration: OrchestrationConfig) -> Iterator[str | None]:
    """One ``LocalCluster`` for every fan-out flow of a pipeline run, when Dask is asked for without an address.

    Args:
        orchestration: the config's ``orchestration`` section.

    Yields:
        The scheduler address to hand to :func:`task_runner`, or None (thread runner, or an external cluster).
    """
    if orchestration.task_runner != "dask" or orchestration.dask_address is not None:
        yield None
        return
    with local_cluster(**local_cluster_kwargs(orchestration.dask_workers)) as cluster:
        yield cluster.scheduler_address
