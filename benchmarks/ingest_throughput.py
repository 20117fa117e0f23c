"""Ingestion throughput, side by side in one run: medtl vs a plain pydicom loop vs MONAI's LoadImage.

Every contender reads the same files (PyPI's pydicom-data, plus ../shared's dcm_qa_nih when present)
from the same folder, after a warm-up (page cache, imports, decoder plugins, medtl's worker fork server)
so that what a process pays once is outside every contender's timing:

* ``pydicom loop``  — ``dcmread`` + ``pixel_array``: the floor, no validation, nothing written;
* ``MONAI LoadImage`` — ``LoadImage(reader="PydicomReader")`` per file: decoding to a MetaTensor;
* ``medtl ingest (N workers)`` — the whole stage: hash, validate, decode, de-identify, window, resize,
  write the array and the de-identified DICOM, ledger and manifest, in sandboxed worker processes;
* ``bare per-file work (N processes)`` — the ceiling of scaling on this machine: the workers' own function
  (``medtl.ingest.worker.ingest_file``) over the same files in a plain ``multiprocessing.Pool`` (fork, one file
  per task), with no sandbox, hashing, ledger or manifest. How far 2 processes beat 1 here is what the hardware
  gives this work; medtl's own scaling is printed as a fraction of it.

Everything is written under ``--workdir`` (default ``runs/bench_ingest`` in the repository, where medtl's runs
write), not the system temporary folder: on the reference VM, creating a file under ``/tmp`` costs ~0.5 ms
and does not get faster with two processes (25 µs elsewhere on the same disk), which would measure that
folder rather than ingestion.

Wall time and CPU time (this process and all its descendants, workers included) are both measured;
"per core" ratios divide files by CPU seconds, which is what a shared cluster node pays.

Machines are noisy (a shared VM varies by ±0.1 in these ratios from run to run), so every contender runs in
``--repeats`` interleaved rounds; each ratio is computed within a round, and its median and every round's value
are printed.

Run: ``.venv/bin/python benchmarks/ingest_throughput.py``
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom" / "dcm_qa_nih" / "In"


def corpus() -> list[Path]:
    """The benchmark's input files: pydicom-data's files, and dcm_qa_nih's when ../shared is present."""
    import data_store  # the pydicom-data package

    files = sorted((Path(data_store.__file__).parent / "data").glob("*"))
    if SHARED_DICOM.is_dir():
        files += sorted(p for p in SHARED_DICOM.rglob("*") if p.is_file())
    else:
        print(f"note: {SHARED_DICOM} not found; benchmarking pydicom-data only")
    return [f for f in files if f.is_file()]


def cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, finished or running.

    ``RUSAGE_CHILDREN`` alone misses medtl's workers: the fork server, not this process, starts and reaps them,
    so their time lands in the fork server's own "children" counters, read here from ``/proc`` (Linux).
    """
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _descendants_cpu_seconds()


def _descendants_cpu_seconds() -> float:
    parent_of, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parent_of[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    me, total = os.getpid(), 0
    for pid in ticks:
        ancestor = parent_of.get(pid)
        while ancestor not in (None, 0, 1, me):
            ancestor = parent_of.get(ancestor)
        if ancestor == me:
            total += ticks[pid]
    return total / os.sysconf("SC_CLK_TCK")


def measure(name: str, run: Callable[[], int]) -> dict:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    ok = run()
    return {"name": name, "wall": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu0, "ok": ok}


def pydicom_loop(files: list[Path]) -> int:
    import pydicom

    ok = 0
    for f in files:
        try:
            pydicom.dcmread(f).pixel_array
            ok += 1
        except Exception:  # the corpus holds deliberately broken files
            pass
    return ok


def monai_loadimage(files: list[Path]) -> int:
    from monai.transforms import LoadImage

    load = LoadImage(reader="PydicomReader", image_only=True)
    ok = 0
    for f in files:
        try:
            load(str(f))
            ok += 1
        except Exception:
            pass
    return ok


def medtl_ingest(folder: Path, workdir: Path, workers: int) -> int:
    from medtl.config import IngestConfig
    from medtl.ingest import ingest_folder
    from medtl.workspace import Workspace

    summary = ingest_folder(IngestConfig(input_dir=folder, image_size=128, workers=workers), Workspace(workdir))
    return summary.ingested


_BARE_SETTINGS = None


def _bare_init(settings) -> None:  # noqa: ANN001 - a WorkerSettings, imported late like every contender's code
    global _BARE_SETTINGS
    _BARE_SETTINGS = settings


def _bare_one(job) -> bool:  # noqa: ANN001
    from medtl.ingest.worker import ingest_file

    return not ingest_file(job, _BARE_SETTINGS).reason


def bare_per_file_work(folder: Path, workdir: Path, processes: int) -> Callable[[], int]:
    """The ceiling contender: set up a fork pool and the jobs (untimed); the returned callable is the timed part."""
    import multiprocessing

    from medtl.config import IngestConfig
    from medtl.ingest.folder import discover, file_sha256, worker_settings
    from medtl.ingest.worker import STAGING, FileJob

    for sub in ("arrays", "dicom", STAGING):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    jobs = [FileJob(path, rel, file_sha256(path)) for rel, path in discover(folder)]
    pool = multiprocessing.get_context("fork").Pool(
        processes, initializer=_bare_init, initargs=(worker_settings(IngestConfig(input_dir=folder, image_size=128),
                                                                      workdir),))
    pool.map(abs, range(processes))  # every process started before the clock

    def run() -> int:
        try:
            return sum(pool.map(_bare_one, jobs, chunksize=1))
        finally:
            pool.terminate()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_ingest",
                        help="where the inputs are copied and the outputs written (not /tmp: see the docstring)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of every contender, interleaved; ratios are taken within a round")
    args = parser.parse_args()
    os.environ.setdefault("MEDTL_UID_SECRET", "benchmark-secret")
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    files = corpus()
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    rounds: list[list[dict]] = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="medtl-bench-", dir=args.workdir) as tmp:
        folder = Path(tmp) / "input"
        folder.mkdir()
        copies = []
        for i, f in enumerate(files):  # one flat folder: the same bytes for every contender
            copies.append(folder / f"{i:04d}_{f.name}")
            shutil.copyfile(f, copies[-1])
        # Warm-up, for every contender alike: page cache, imports, decoder plugins; for medtl also the worker
        # fork server, which a process starts once (its imports are the contenders' imports)
        pydicom_loop(copies)
        monai_loadimage(copies[:5])
        warm = Path(tmp) / "warm-up"
        warm.mkdir()
        for f in copies[:5]:
            shutil.copyfile(f, warm / f.name)
        medtl_ingest(warm, Path(tmp) / "warm-up-work", 1)
        for _ in range(args.repeats):
            results = [measure("pydicom loop (dcmread + pixel_array)", lambda: pydicom_loop(copies)),
                       measure("MONAI LoadImage(PydicomReader)", lambda: monai_loadimage(copies))]
            for n in args.workers:
                work = Path(tmp) / f"work{n}"
                results.append(measure(f"medtl ingest, {n} worker{'s' if n > 1 else ''}",
                                       lambda n=n, work=work: medtl_ingest(folder, work, n)))
                shutil.rmtree(work)
            for n in args.workers:
                work = Path(tmp) / f"bare{n}"
                results.append(measure(f"bare per-file work, {n} process{'es' if n > 1 else ''}",
                                       bare_per_file_work(folder, work, n)))
                shutil.rmtree(work)
            rounds.append(results)

    print(f"\n{len(files)} files, {megabytes:.1f} MB, {os.cpu_count()} CPUs, {args.repeats} rounds "
          "(medians per contender)\n")
    print(f"{'contender':42s} {'ok':>5s} {'wall s':>8s} {'CPU s':>8s} {'files/s':>9s} {'MB/s':>7s} "
          f"{'files/CPU-s':>12s}")
    for i, name in enumerate(r["name"] for r in rounds[0]):
        ok = rounds[0][i]["ok"]
        wall = statistics.median(r[i]["wall"] for r in rounds)
        cpu = statistics.median(r[i]["cpu"] for r in rounds)
        print(f"{name:42s} {ok:5d} {wall:8.2f} {cpu:8.2f} {len(files) / wall:9.1f} {megabytes / wall:7.1f} "
              f"{len(files) / cpu:12.1f}")
    print()
    k = len(args.workers)  # medtl's runs are r[2:2 + k], the bare ones r[2 + k:]
    ratios = {"medtl (1 worker) vs MONAI LoadImage, wall": (lambda r, by, bare: r[1]["wall"] / by[1]["wall"], ""),
              "medtl (1 worker) vs MONAI LoadImage, per core": (lambda r, by, bare: r[1]["cpu"] / by[1]["cpu"],
                                                                "  (target >= 2)"),
              "medtl 2 workers vs 1 worker, wall": (lambda r, by, bare: by[1]["wall"] / by[2]["wall"],
                                                    "  (target >= 1.8)"),
              "ceiling: bare work, 2 processes vs 1, wall": (lambda r, by, bare: bare[1]["wall"] / bare[2]["wall"], ""),
              "medtl's scaling / the ceiling's": (
                  lambda r, by, bare: (by[1]["wall"] / by[2]["wall"]) / (bare[1]["wall"] / bare[2]["wall"]), "")}
    for label, (ratio, target) in ratios.items():
        try:
            values = [ratio(r, dict(zip(args.workers, r[2:2 + k])), dict(zip(args.workers, r[2 + k:])))
                      for r in rounds]
        except KeyError:  # that worker count was not run
            continue
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"{label + ':':48s} median {statistics.median(values):.2f}x{target}   rounds: {spread}")


if __name__ == "__main__":
    main()
