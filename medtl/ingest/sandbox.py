"""Run a function over untrusted inputs in limited worker processes, one result per input, in order.

Parsing a hostile file can exhaust memory, hang, or crash a C decoder. None of that may stop an
ingestion run or take the machine down, so every input is handled in a worker process that

* is started fresh: forked from a clean fork server that has imported the job's module once (``spawn``
  where the platform has no fork server), so it does not inherit the parent's address space (a
  CUDA-enabled torch alone maps gigabytes) and the limit below measures the file's cost, not the
  caller's; a replacement for a worker that a hostile file killed starts in milliseconds;
* has an address-space limit (``RLIMIT_AS``, ``memory_mb`` above what the fresh interpreter maps): an
  allocation past it raises ``MemoryError`` in the worker instead of waking the kernel's OOM killer;
* has a time limit per input: a worker that does not answer in time is killed;
* is replaced after a ``MemoryError``: what the failed input allocated may stay mapped (a heap the
  allocator does not give back), and every later input the worker took would fail for lack of memory.

When a worker dies, hangs or runs out of memory, the inputs it might have been working on are re-run one at
a time in a fresh single-worker pool, so exactly the guilty input is reported through ``on_failure`` and every
other input still gets its normal result. :func:`is_resource_failure` tells those reasons from an error the
input itself raised.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

J = TypeVar("J")
R = TypeVar("R")

_TIMED_OUT, _WORKER_DIED, _NO_MEMORY = "timed out: ", "the worker process died ", "out of memory: "
_LOOKAHEAD = 32  # inputs queued per worker: a slow input at the head of the line must not leave workers idle
_BATCH = 4  # inputs per submission at most


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks set by cluster schedulers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_resource_failure(reason: str) -> bool:
    """Whether an ``on_failure`` reason is a resource limit (timed out, worker killed, out of memory), which a
    later run on a less busy machine or with higher limits may get past, rather than an error of the input.

    Args:
        reason: as given to ``on_failure``.

    Returns:
        True for a timeout, a worker that died and a worker out of memory.

    Examples:
        >>> is_resource_failure("out of memory: needs more than ingest.worker_memory_mb=64 MiB")
        True
    """
    return reason.startswith((_TIMED_OUT, _WORKER_DIED, _NO_MEMORY))


def _limit_address_space(memory_mb: int) -> None:
    import resource

    # On top of what the worker already maps (the interpreter and its libraries), so the limit is the file's budget.
    limit = _mapped_bytes() + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):  # not Linux: count from zero
        return 0


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While worker processes start, hide the caller's ``__main__`` from them.

    Workers started by ``spawn`` or forked by the fork server re-import the parent's main module. Behind a Prefect flow or the ``medtl`` CLI that
    module imports prefect and a CUDA build of torch (seconds and gigabytes per worker, none of it needed), and a
    script without an ``if __name__ == "__main__":`` guard would start ingesting again inside each worker.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def sandboxed_map(fn: Callable[[J], R], jobs: Iterable[J], *, workers: int = 1, memory_mb: int = 3072,
                  timeout_s: float = 120.0, on_failure: Callable[[J, str], R]) -> Iterator[R]:
    """Yield ``fn(job)`` for every job, in order, computed in sandboxed worker processes.

    Args:
        fn: a picklable (module-level) function; it should catch its own expected errors. An
            exception that escapes it is passed to ``on_failure`` like a crash.
        jobs: picklable inputs.
        workers: worker processes (>= 1).
        memory_mb: address-space limit of each worker, in MiB.
        timeout_s: seconds one job may take. Jobs travel in small batches; a batch that takes longer is
            re-run one job at a time, so only a job that alone exceeds the limit fails.
        on_failure: ``on_failure(job, reason)`` builds the result of a job whose worker died, hung or
            raised; ``reason`` says which, in words meant for the ledger.

    Returns:
        An iterator of results, one per job, in the order of ``jobs``.

    Raises:
        ValueError: for ``workers < 1``, ``memory_mb < 64`` or ``timeout_s <= 0``.

    Examples:
        >>> list(sandboxed_map(abs, [-1, 2], on_failure=lambda job, why: None))
        [1, 2]
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (MiB), got {memory_mb}: Python alone needs more")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    queue: deque[J] = deque(jobs)
    suspects: deque[J] = deque()
    while queue or suspects:
        if suspects:
            yield from _run_pool(fn, deque([suspects.popleft()]), 1, memory_mb, timeout_s, on_failure, suspects,
                                 isolated=True)
        else:
            yield from _run_pool(fn, queue, workers, memory_mb, timeout_s, on_failure, suspects, isolated=False)


def _run_pool(fn: Callable[[J], R], queue: deque[J], workers: int, memory_mb: int, timeout_s: float,
              on_failure: Callable[[J, str], R], suspects: deque[J], *, isolated: bool) -> Iterator[R]:
    """Drain ``queue`` through one pool; on a crash or a hang, move the jobs in doubt to ``suspects`` and return."""
    module = getattr(getattr(fn, "func", fn), "__module__", None) or "builtins"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(module),
                               initializer=_limit_address_space, initargs=(memory_mb,))
    inflight: deque[tuple[tuple[J, ...], Future]] = deque()
    try:
        _start_workers(pool, workers, module, memory_mb)
        head_deadline = None
        while queue or inflight:
            # Results are yielded in input order, but a slow input at the head must not starve the other workers:
            # only batches not yet done count against the lookahead, and any batch finishing wakes this loop to
            # refill the pool.
            while queue and sum(len(b) for b, f in inflight if not f.done()) < _LOOKAHEAD * workers:
                # a few jobs per submission spare the pool's threads and pipes most of their per-job work; the
                # last ones go one by one so that no worker idles while another still holds a batch
                size = max(1, min(_BATCH, len(queue) // (2 * workers)))
                batch = tuple(queue.popleft() for _ in range(size))
                try:
                    with _main_module_hidden():  # submit starts the workers it needs
                        inflight.append((batch, pool.submit(_run_batch, fn, batch)))
                except BrokenProcessPool:  # a batch in flight killed its worker: the handling below names it
                    queue.extendleft(reversed(batch))
                    break
            if not inflight:  # broken before anything was submitted: no job is to blame, start a fresh pool
                return
            batch, future = inflight[0]
            if head_deadline is None:  # the head's time limit runs from when it reached the head, as before
                head_deadline = time.monotonic() + timeout_s
            if not future.done():
                wait([f for _, f in inflight if not f.done()], timeout=max(0.0, head_deadline - time.monotonic()),
                     return_when=FIRST_COMPLETED)
                if not future.done() and time.monotonic() < head_deadline:
                    continue  # another batch finished: refill, then wait on the head again
            try:
                outcomes = future.result(timeout=0)
            except FutureTimeout:
                inflight.popleft()
                _kill_workers(pool)
                if len(batch) == 1:
                    yield on_failure(batch[0], f"{_TIMED_OUT}parsing took longer than {timeout_s:g} s "
                                               "(raise ingest.file_timeout_s if the file is legitimately large)")
                else:
                    suspects.extend(batch)  # one of them hangs, or together they ran long: each alone decides
                queue.extendleft(reversed([j for b, _ in inflight for j in b]))  # innocent: run them again normally
                return
            except BrokenProcessPool:
                if isolated:
                    yield on_failure(batch[0], f"{_WORKER_DIED}while parsing this file (out of memory beyond "
                                               f"ingest.worker_memory_mb={memory_mb}, or a crash in a decoder)")
                    inflight.popleft()
                else:
                    suspects.extend(j for b, _ in inflight for j in b)
                return
            except Exception as exc:  # a result that cannot travel back: keep the evidence, go on with the rest
                outcomes = [(_ERROR, f"{type(exc).__name__}: {exc}")] * len(batch)
            head_deadline = None
            inflight.popleft()
            for i, (job, (status, value)) in enumerate(zip(batch, outcomes)):
                if status == _OUT_OF_MEMORY:
                    # The worker that ran out is poisoned, and which one it was is unknown here: replace them all.
                    # The jobs after it, in its batch (never run) and in flight (maybe run by it), go again.
                    _kill_workers(pool)
                    queue.extendleft(reversed([*batch[i + 1:], *(j for b, _ in inflight for j in b)]))
                    if isolated:
                        detail = f" (MemoryError: {value})" if value else ""
                        yield on_failure(job, f"{_NO_MEMORY}needs more than ingest.worker_memory_mb={memory_mb} MiB"
                                              f"{detail}")
                    else:
                        suspects.append(job)  # alone in a fresh worker, it shows whether it needs that much itself
                    return
                yield value if status == _DONE else on_failure(job, f"unexpected error: {value}")
    finally:
        if inflight:
            _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


_DONE, _OUT_OF_MEMORY, _ERROR = "done", "out of memory", "error"


def _run_batch(fn: Callable[[J], R], jobs: tuple[J, ...]) -> list[tuple[str, object]]:
    """In a worker: ``fn`` over a few jobs; an exception escaping ``fn`` fails its own job only, and a
    ``MemoryError`` ends the batch (the jobs left are not run: this worker is to be replaced)."""
    outcomes: list[tuple[str, object]] = []
    for job in jobs:
        try:
            outcomes.append((_DONE, fn(job)))
        except MemoryError as exc:
            outcomes.append((_OUT_OF_MEMORY, str(exc)))  # e.g. which decoder, how much it asked for
            break
        except Exception as exc:  # fn's own escape hatch: the reason travels back as text (exceptions may not pickle)
            outcomes.append((_ERROR, f"{type(exc).__name__}: {exc}"))
    return outcomes


def _worker_context(module: str) -> multiprocessing.context.BaseContext:
    """``forkserver`` preloading ``module`` where the platform has it (Linux, macOS), else ``spawn``.

    The fork server is one clean interpreter per process that imports ``module`` once and forks each worker
    from itself: a worker starts without re-importing pydicom and numpy (0.4 s of CPU each, paid again for
    every worker a hostile file kills). Its preload list is set here because the default preloads the
    caller's ``__main__``, which behind the CLI or a Prefect flow imports torch.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module])  # no effect once the server runs: it serves every later pool
    return context


class WorkersCannotStart(RuntimeError):
    """Worker processes die before running anything: no input is to blame, so none is quarantined."""


def _warm(module: str) -> None:
    importlib.import_module(module)


def _start_workers(pool: ProcessPoolExecutor, workers: int, module: str, memory_mb: int) -> None:
    """Start every worker at once and have each import ``module`` (the job function's), in parallel.

    The pool would otherwise start one worker per submission, the second only after the first is busy. And a pool
    whose workers cannot start at all must not be read as every input killing its worker.
    """
    try:
        with _main_module_hidden():
            warming = [pool.submit(_warm, module) for _ in range(workers)]
        for future in warming:
            future.result(timeout=120)
    except (BrokenProcessPool, FutureTimeout, ImportError) as exc:
        raise WorkersCannotStart(
            f"worker processes cannot start (they need a Python able to import {module}, and "
            f"ingest.worker_memory_mb={memory_mb} MiB beyond what the interpreter maps)") from exc


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor has no public kill before Python 3.14 (kill_workers); a hung worker must go.
    kill = getattr(pool, "kill_workers", None)
    if callable(kill):
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
