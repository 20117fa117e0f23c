"""Worker sandbox: a job that crashes, hangs, raises or exhausts memory fails alone; the rest go on, in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtl.ingest.sandbox import sandboxed_map


def _behave(job: str) -> str:
    if job == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if job == "hang":
        time.sleep(600)
    if job == "raise":
        raise RuntimeError("boom")
    if job == "hog":
        return str(len(bytearray(2 * 1024**3)))  # 2 GiB, far over the limit below
    return job.upper()


def _failure(job: str, reason: str) -> str:
    return f"FAILED {job}: {reason}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 2])
def test_each_bad_job_fails_alone_and_order_is_kept(workers):
    jobs = ["a", "crash", "b", "hang", "c", "raise", "d", "hog", "e"]
    results = list(sandboxed_map(_behave, jobs, workers=workers, memory_mb=512, timeout_s=5, on_failure=_failure))

    assert [r.split(":")[0] for r in results] == ["A", "FAILED crash", "B", "FAILED hang", "C", "FAILED raise",
                                                  "D", "FAILED hog", "E"]
    assert "worker process died" in results[1]
    assert "timed out" in results[3]
    assert "RuntimeError: boom" in results[5]
    assert "MemoryError" in results[7] or "out of memory" in results[7]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="workers"):
        list(sandboxed_map(abs, [1], workers=0, on_failure=_failure))
    with pytest.raises(ValueError, match="timeout_s"):
        list(sandboxed_map(abs, [1], timeout_s=0, on_failure=_failure))


def test_workers_do_not_import_the_callers_main_module(tmp_path):
    # A script calling medtl at top level, without an `if __name__ == "__main__":` guard: 'spawn' would run it
    # again in every worker (and behind the CLI or a Prefect flow, import torch and prefect there).
    script = tmp_path / "unguarded.py"
    script.write_text("print('script body ran', flush=True)\n"
                      "from medtl.ingest.sandbox import sandboxed_map\n"
                      "print(list(sandboxed_map(abs, [-1, 2], workers=2, on_failure=lambda job, why: why)))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["script body ran", "[1, 2]"]  # once: the workers did not run it again
