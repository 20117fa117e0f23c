"""Time and compare medtl's series → NIfTI conversion against dcm2niix on the same DICOM folder.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/series_to_nifti.py [INPUT_DIR] [--repeats N]
        [--dcm2niix PATH] [--json OUT] [--keep DIR]

INPUT_DIR defaults to ``../shared/data/dicom/dcm_qa_nih/In`` (relative to the repository root); any DICOM
folder will do. dcm2niix is a benchmark-only tool, not a medtl dependency: install it into the venv with
``.venv/bin/pip install dcm2niix`` (the wheel ships the binary as ``.venv/bin/dcm2niix``), or pass
``--dcm2niix PATH``.

**Timing.** Each repeat runs both converters once, alternating, into fresh temporary folders, plus the whole 3D
ingestion stage; the medians are reported (``--repeats 0`` skips timing). medtl's time covers discovering the
files, reading, grouping, assembling and writing every series (``series_to_nifti``) in this process;
dcm2niix's is the wall time of ``dcm2niix -g i -b y -f %s_%d -o OUT INPUT`` (default flags; the naming is
``<SeriesNumber>_<SeriesDescription>``, the JSON sidecars are dcm2niix's default anyway, and ``-g i`` ignores a
user's ``~/.dcm2nii.ini`` so that "default" means dcm2niix's built-in defaults). The issue's target is a ratio
within 3.

**Comparison.** Both converters write the folder once more, and every dcm2niix output series is classified:

* *identical at default flags*: a medtl file has the same shape, sform (to 1e-4 mm), stored voxels and
  dtype, scl_slope/scl_inter (to 1e-6 relative), pixdim[4] (TR, 4D only) and, where either side has
  ``.bval``/``.bvec`` of the same stem, the same b-values (1e-3 relative) and vectors (1e-3 absolute);
* *identical only under FLAGS*: identical to the output of dcm2niix run with one of :data:`VARIANTS`
  (each run once, into its own folder, only when some series is not identical at default flags);
* *different*, with how: shape, affine, layout, scaling factor, stored type, TR, b-values/vectors, voxel
  counts, or a split (several medtl files of one series whose volumes concatenate to one dcm2niix file) or a
  merge (the reverse);
* *lost*: no medtl file matches the dcm2niix series (medtl's reason is quoted when it refused the series).

medtl files that match no dcm2niix series are listed as *extra*. Files are matched by content (shape, sform,
data), not by name; equal series numbers (medtl's ``SeriesNumber``, dcm2niix's JSON ``SeriesNumber``) let
non-identical files pair up. medtl is given every file under INPUT_DIR; dcm2niix searches its default 5 folder
levels (``-d 5``), so series deeper than that show up as extra. Every output is held in memory while it is
compared (a benchmark on folders of research size, not a whole archive).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medtl.ingest.volume import SeriesOutcome, series_to_nifti

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "dcm_qa_nih" / "In"

DEFAULT_FLAGS: tuple[str, ...] = ("-g", "i", "-b", "y", "-f", "%s_%d")
"""dcm2niix's defaults, with ``%s_%d`` naming and its user defaults file ignored (``-g i``)."""
VARIANTS: tuple[tuple[str, ...], ...] = (
    ("-x", "i"),        # neither crop nor rotate 3D acquisitions
    ("-p", "n"),        # Philips display scaling instead of precise float
    ("-m", "y"),        # merge 2D slices of a series regardless of echo, exposure, …
    ("-m", "n"),        # never merge
    ("-x", "i", "-p", "n"),
)
"""Non-default flag sets tried, in this order, for series that are not identical at default flags."""

AFFINE_TOL_MM = 1e-4
SCALING_RTOL = 1e-6
VALUE_RTOL = 1e-6  # scaled voxel values: float32 stores ~7 significant digits
TR_RTOL = 1e-6     # pixdim[4] is float32; medtl's 2.43537 s and dcm2niix's 2435.37 ms / 1000 differ by 1 ulp
BVAL_RTOL = 1e-3
BVEC_ATOL = 1e-3
LAYOUT_TOL_VOXELS = 1e-3

IDENTICAL, UNDER_FLAGS, DIFFERENT, LOST, EXTRA = "identical", "under_flags", "different", "lost", "extra"


# ----------------------------------------------------------------------------------------------
# dcm2niix


def find_dcm2niix(explicit: str | None) -> str:
    """The dcm2niix executable: ``explicit``, else next to ``sys.executable`` (a venv's ``bin``), else on PATH.

    Args:
        explicit: ``--dcm2niix`` (a path or a name on PATH), or ``None``.

    Returns:
        The path to run.

    Raises:
        SystemExit: with instructions, when none is found.
    """
    hint = ("install it into this environment with `.venv/bin/pip install dcm2niix` (benchmark-only, not a "
            "medtl dependency; the wheel ships the binary), or pass --dcm2niix PATH")
    if explicit:
        found = explicit if Path(explicit).is_file() else shutil.which(explicit)
        if not found:
            raise SystemExit(f"dcm2niix not found at {explicit!r}; {hint}")
        return found
    # sys.executable unresolved: a venv's python is a symlink to the base interpreter, whose bin lacks dcm2niix
    beside = Path(sys.executable).parent / ("dcm2niix.exe" if os.name == "nt" else "dcm2niix")
    if beside.is_file():
        return str(beside)
    found = shutil.which("dcm2niix")
    if not found:
        raise SystemExit(f"dcm2niix not found next to {sys.executable} or on PATH; {hint}")
    return found


def dcm2niix_version(exe: str) -> str:
    """The version dcm2niix reports (``v1.0.20260724``), or ``unknown``."""
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = re.findall(r"v\d+\.\d+\.\d+\w*", done.stdout + done.stderr)
    return found[-1] if found else "unknown"


def run_dcm2niix(exe: str, input_dir: Path, out_dir: Path, flags: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run ``dcm2niix DEFAULT_FLAGS FLAGS -o out_dir input_dir``; a failure is returned, not raised.

    dcm2niix exits non-zero when some input is not convertible while still writing the rest, so the caller
    looks at what was written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([exe, *DEFAULT_FLAGS, *flags, "-o", str(out_dir), str(input_dir)],
                          capture_output=True, text=True)


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))


# ----------------------------------------------------------------------------------------------
# timing (issue 3)


def input_files(input_dir: Path) -> list[Path]:
    """Every file under ``input_dir``, sorted (what medtl is given; dcm2niix searches the folder itself)."""
    return sorted(p for p in input_dir.rglob("*") if p.is_file())


def time_medtl(input_dir: Path, out_dir: Path) -> tuple[float, int]:
    """Seconds to convert ``input_dir`` with medtl, and the number of NIfTI files written."""
    start = time.perf_counter()
    outcomes = series_to_nifti(input_files(input_dir), out_dir)
    return time.perf_counter() - start, sum(o.status == "written" for o in outcomes)


def time_ingest(input_dir: Path, out_dir: Path, workers: int) -> tuple[float, int]:
    """Seconds for the whole 3D ingestion stage (``spatial_dims: 3``), and the number of NIfTI files written.

    Ingestion does more than convert: it hashes, validates, de-identifies and writes de-identified DICOM
    copies and model-ready arrays too, in ``workers`` sandboxed processes.
    """
    import logging

    from medtl.config import IngestConfig
    from medtl.ingest import ingest_folder
    from medtl.workspace import Workspace

    os.environ.setdefault("MEDTL_UID_SECRET", "benchmark-secret")
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    ingest_folder(IngestConfig(input_dir=input_dir, spatial_dims=3, image_size=64, workers=workers),
                  Workspace(out_dir))
    return time.perf_counter() - start, len(list((out_dir / "ingest" / "volumes").glob("*.nii")))


def time_dcm2niix(exe: str, input_dir: Path, out_dir: Path) -> tuple[float, int]:
    """Seconds to convert ``input_dir`` with dcm2niix at default flags, and the number of NIfTI files written."""
    start = time.perf_counter()
    run_dcm2niix(exe, input_dir, out_dir)
    return time.perf_counter() - start, len(nifti_files(out_dir))


def timing(exe: str, input_dir: Path, repeats: int) -> dict:
    """Medians of ``repeats`` alternating runs of medtl, dcm2niix and medtl's 3D ingestion, printed and returned."""
    ours, theirs, ingests = [], [], []
    n_ours = n_theirs = n_ingest = 0
    ingest_error = ""
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
                tempfile.TemporaryDirectory() as c:
            seconds, n_ours = time_medtl(input_dir, Path(a))
            ours.append(seconds)
            seconds, n_theirs = time_dcm2niix(exe, input_dir, Path(b))
            theirs.append(seconds)
            if not ingest_error:
                try:
                    seconds, n_ingest = time_ingest(input_dir, Path(c), workers=2)
                    ingests.append(seconds)
                except Exception as exc:  # noqa: BLE001 — an odd folder may fail ingestion; the timing still stands
                    ingest_error = f"{type(exc).__name__}: {exc}"
    medtl_s, dcm2niix_s = statistics.median(ours), statistics.median(theirs)
    print(f"medtl    series_to_nifti: {medtl_s:.3f} s  ({n_ours} NIfTI; median of {repeats})")
    print(f"dcm2niix {' '.join(DEFAULT_FLAGS)}: {dcm2niix_s:.3f} s  ({n_theirs} NIfTI; median of {repeats})")
    result = {"repeats": repeats, "medtl_s": medtl_s, "medtl_nifti": n_ours, "dcm2niix_s": dcm2niix_s,
              "dcm2niix_nifti": n_theirs, "ratio": medtl_s / dcm2niix_s}
    if ingests:
        ingest_s = statistics.median(ingests)
        print(f"medtl ingest, 3D, 2 workers (+ de-identification, DICOM copies, arrays): {ingest_s:.3f} s  "
              f"({n_ingest} NIfTI)")
        result |= {"ingest_s": ingest_s, "ingest_nifti": n_ingest, "ingest_ratio": ingest_s / dcm2niix_s}
    else:
        print(f"medtl ingest, 3D: failed ({ingest_error})")
        result["ingest_error"] = ingest_error
    print(f"ratio medtl series_to_nifti / dcm2niix:  {medtl_s / dcm2niix_s:.2f}  (target <= 3)")
    if ingests:
        print(f"ratio medtl 3D ingest / dcm2niix:        {result['ingest_ratio']:.2f}")
    return result


# ----------------------------------------------------------------------------------------------
# reading outputs


@dataclass
class Image:
    """One NIfTI output, read lazily.

    Attributes:
        path: the file.
        series_number: medtl's group SeriesNumber, or dcm2niix's JSON ``SeriesNumber`` (else the name's prefix).
        label: series number and description, for the table.
        description: SeriesDescription (medtl's group, dcm2niix's JSON sidecar), to explain lost series.
    """

    path: Path
    series_number: int | None
    label: str
    description: str = ""

    @functools.cached_property
    def _img(self):
        import nibabel as nib
        return nib.load(self.path)

    @functools.cached_property
    def stored(self) -> np.ndarray:
        """The stored values (before scl_slope/scl_inter); RGB triples become a last axis of 3."""
        data = np.asanyarray(self._img.dataobj.get_unscaled())
        if data.dtype.names:  # RGB24: a structured dtype
            data = np.stack([data[name] for name in data.dtype.names], axis=-1)
        return data

    @property
    def shape(self) -> tuple[int, ...]:
        """The data shape, from the header (no voxels read); RGB adds a last axis of 3, as in ``stored``."""
        rgb = bool(self._img.get_data_dtype().names)
        return tuple(self._img.shape) + ((len(self._img.get_data_dtype().names),) if rgb else ())

    @functools.cached_property
    def affine(self) -> np.ndarray:
        """The sform (what both converters set, code 1), else nibabel's best affine."""
        sform = self._img.header.get_sform()
        return sform if int(self._img.header["sform_code"]) else self._img.header.get_best_affine()

    @functools.cached_property
    def scaling(self) -> tuple[float, float]:
        """(scl_slope, scl_inter) as NIfTI-1 means them (a slope of 0 or NaN is no scaling: (1, 0)).

        Read from the array proxy: on load nibabel moves the file's scaling there and sets the image header's
        scl_slope/scl_inter to NaN.
        """
        proxy = self._img.dataobj
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        if not np.isfinite(slope) or slope == 0:
            return 1.0, 0.0
        return slope, inter if np.isfinite(inter) else 0.0

    @functools.cached_property
    def values(self) -> np.ndarray:
        """Stored values × slope + intercept, float64."""
        slope, inter = self.scaling
        return self.stored.astype(np.float64) * slope + inter

    @property
    def volumes(self) -> int:
        """Number of volumes along axis 3 (1 for a 3D file)."""
        return self.shape[3] if len(self.shape) > 3 else 1

    def as_4d(self) -> np.ndarray:
        """``values`` with a volume axis (a 3D file is one volume)."""
        return self.values if self.values.ndim > 3 else self.values[..., np.newaxis]

    @functools.cached_property
    def tr_s(self) -> float | None:
        """pixdim[4] in seconds, for a 4D file (``None`` for 3D)."""
        if self.volumes < 2:
            return None
        tr = float(self._img.header["pixdim"][4])
        unit = self._img.header.get_xyzt_units()[1]
        return tr / 1000 if unit == "msec" else tr / 1e6 if unit == "usec" else tr

    def _sibling(self, suffix: str) -> Path:
        stem = self.path.name.removesuffix(".gz").removesuffix(".nii")
        return self.path.with_name(stem + suffix)

    @functools.cached_property
    def bvals(self) -> np.ndarray | None:
        path = self._sibling(".bval")
        return np.atleast_1d(np.loadtxt(path, ndmin=1)) if path.is_file() else None

    @functools.cached_property
    def bvecs(self) -> np.ndarray | None:
        path = self._sibling(".bvec")
        return np.loadtxt(path, ndmin=2) if path.is_file() else None

    def release(self) -> None:
        """Drop the cached arrays (large folders: keep at most a few in memory)."""
        for name in ("_img", "stored", "values"):
            self.__dict__.pop(name, None)


def medtl_images(outcomes: Iterable[SeriesOutcome]) -> list[Image]:
    """An :class:`Image` per written medtl outcome, labelled from its group."""
    images = []
    for o in outcomes:
        if o.status == "written" and o.nifti is not None:
            first = o.group.headers[0] if o.group else None
            images.append(Image(Path(o.nifti), first.series_number if first else None,
                                o.group.describe() if o.group else o.nifti.stem,
                                first.series_description if first else ""))
    return images


def dcm2niix_images(folder: Path) -> list[Image]:
    """An :class:`Image` per NIfTI dcm2niix wrote; series numbers from the JSON sidecars (else the ``%s_`` prefix)."""
    images = []
    for path in nifti_files(folder):
        stem = path.name.removesuffix(".gz").removesuffix(".nii")
        number: int | None = None
        sidecar: dict = {}
        try:
            sidecar = json.loads(path.with_name(stem + ".json").read_text(errors="replace"))
            number = int(sidecar.get("SeriesNumber"))
        except (OSError, ValueError, TypeError, AttributeError):  # no sidecar, bad JSON, or no number in it
            match = re.match(r"(\d+)_", stem)
            number = int(match.group(1)) if match else None
        description = sidecar.get("SeriesDescription", "") if isinstance(sidecar, dict) else ""
        images.append(Image(path, number, stem, str(description)))
    return images


# ----------------------------------------------------------------------------------------------
# comparing two files


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def _g(x: float) -> str:
    return f"{x:.6g}"


def _span(first: int, n: int) -> str:
    """``volume 3`` or ``volumes 3–7``."""
    return f"volume {first}" if n == 1 else f"volumes {first}–{first + n - 1}"


def _signed(inter: float) -> str:
    """``+x``/``-x`` for an intercept, empty for 0."""
    return "" if inter == 0 else f"{'+' if inter > 0 else '-'}{_g(abs(inter))}"


def _values_close(a: np.ndarray, b: np.ndarray) -> bool:
    """Same scaled values: relative to each value, with a floor relative to the range (near-zero voxels)."""
    if a.shape != b.shape:
        return False
    scale = max(float(np.nanmax(np.abs(a), initial=0)), float(np.nanmax(np.abs(b), initial=0)), 1e-30)
    return bool(np.allclose(a, b, rtol=VALUE_RTOL, atol=VALUE_RTOL * scale, equal_nan=True))


def _corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous voxel coordinates of the 8 corner voxels of a 3D grid, 4×8."""
    ranges = [(0, max(n - 1, 0)) for n in (list(shape[:3]) + [1, 1, 1])[:3]]
    return np.array([[*c, 1.0] for c in itertools.product(*ranges)]).T


def same_affine(a: Image, b: Image) -> bool:
    """Every sform element within :data:`AFFINE_TOL_MM`."""
    return bool(np.abs(a.affine - b.affine).max() <= AFFINE_TOL_MM)


def same_grid(a: Image, b: Image) -> bool:
    """Same 3D grid: equal first three dimensions and sform (the number of volumes may differ)."""
    return a.shape[:3] == b.shape[:3] and same_affine(a, b)


def layout_map(m: Image, d: Image) -> tuple[list[int], list[bool]] | None:
    """How ``d``'s voxel axes come from ``m``'s when both sample the same points in another axis order.

    Returns:
        ``(perm, flips)``: ``d`` axis ``j`` is ``m`` axis ``perm[j]``, reversed where ``flips[j]``; ``None``
        when the grids are not a permutation/flip of each other (or are the same grid).
    """
    if len(m.shape) < 3 or len(d.shape) < 3:
        return None
    try:
        t = np.linalg.solve(d.affine, m.affine)  # m voxel → d voxel
    except np.linalg.LinAlgError:
        return None
    r = t[:3, :3]
    p = np.rint(r)
    if np.abs(r - p).max() > LAYOUT_TOL_VOXELS or not (np.abs(p).sum(0) == 1).all() \
            or not (np.abs(p).sum(1) == 1).all():
        return None
    perm = [int(np.argmax(np.abs(p[j]))) for j in range(3)]
    flips = [bool(p[j, perm[j]] < 0) for j in range(3)]
    if perm == [0, 1, 2] and not any(flips):
        return None
    if any(d.shape[j] != m.shape[perm[j]] for j in range(3)):
        return None
    # m's voxel 0 must land on d's first voxel along kept axes and on its last along reversed ones
    expected = [d.shape[j] - 1 if flips[j] else 0 for j in range(3)]
    if np.abs(t[:3, 3] - expected).max() > LAYOUT_TOL_VOXELS:
        return None
    return perm, flips


def _relayout(values: np.ndarray, perm: list[int], flips: list[bool]) -> np.ndarray:
    out = np.transpose(values, perm + list(range(3, values.ndim)))
    for j, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=j)
    return out


def volume_offset(part: np.ndarray, whole: np.ndarray) -> int | None:
    """The first volume ``t`` of 4D ``whole`` where ``whole[..., t:t+n]`` equals 4D ``part`` (same 3D grid)."""
    n, total = part.shape[3], whole.shape[3]
    for t in range(total - n + 1):
        # the first volume alone rules out almost every offset cheaply
        if _values_close(part[..., 0], whole[..., t]) and _values_close(part, whole[..., t:t + n]):
            return t
    return None


def tiling(parts: Sequence[Image], whole: Image) -> list[tuple[Image, int]] | None:
    """``parts`` (≥ 2, same 3D grid as ``whole``) whose volumes, concatenated along axis 3, are ``whole``'s.

    Returns:
        ``(part, first volume)`` in volume order, or ``None`` when they do not tile ``whole`` exactly.
    """
    target = whole.as_4d()
    placed = []
    for part in parts:
        offset = volume_offset(part.as_4d(), target)
        if offset is not None:
            placed.append((part, offset))
    placed.sort(key=lambda x: x[1])
    covered = 0
    chain = []
    for part, offset in placed:
        if offset == covered:  # contiguous, no overlap; a duplicate part at the same offset is skipped
            chain.append((part, offset))
            covered += part.volumes
    return chain if len(chain) >= 2 and covered == whole.volumes else None


@dataclass
class Relation:
    """How a medtl file relates to a dcm2niix file.

    Attributes:
        score: closeness for matching, lower is closer: 0 identical; 1 same grid and values (type, scaling,
            TR or diffusion differ); 2 same grid, other values; 3 same values in another voxel layout;
            4 same data, other affine; 5 otherwise (only series numbers relate them).
        differences: what differs (empty when identical).
    """

    score: int
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences


def _scaling_note(m: Image, d: Image) -> str:
    (ms, mi), (ds, di) = m.scaling, d.scaling
    return f"medtl {m.stored.dtype} ×{_g(ms)}{_signed(mi)}, dcm2niix {d.stored.dtype} ×{_g(ds)}{_signed(di)}"


def _value_differences(m: Image, d: Image) -> tuple[bool, list[str]]:
    """(same scaled values?, differences) for two files on the same grid with the same shape."""
    same_stored = m.stored.dtype == d.stored.dtype and np.array_equal(m.stored, d.stored, equal_nan=True)
    (ms, mi), (ds, di) = m.scaling, d.scaling
    same_scaling = bool(np.isclose(ms, ds, rtol=SCALING_RTOL, atol=0)
                        and np.isclose(mi, di, rtol=SCALING_RTOL, atol=SCALING_RTOL * max(abs(ms), abs(ds))))
    if same_stored and same_scaling:
        return True, []
    a, b = m.values, d.values
    if _values_close(a, b):
        return True, [f"same values, different stored type/scaling ({_scaling_note(m, d)})"]
    nonzero = np.abs(a) > 0
    if nonzero.any():
        k = float(np.median(b[nonzero] / a[nonzero]))
        if k != 0 and not np.isclose(k, 1.0, rtol=1e-6) and _values_close(a * k, b):
            return False, [f"scaling factor {_g(k)}× (dcm2niix / medtl; {_scaling_note(m, d)})"]
    differ = ~np.isclose(a, b, rtol=VALUE_RTOL, atol=VALUE_RTOL * max(float(np.abs(a).max(initial=0)), 1e-30),
                         equal_nan=True)
    n = int(differ.sum())
    delta = float(np.nanmax(np.abs(a - b)[differ])) if n else 0.0
    return False, [f"voxels differ at {n} of {a.size} voxels (max |Δ| {_g(delta)})"]


def _bvals_summary(bvals: np.ndarray | None) -> str:
    if bvals is None:
        return "no .bval"
    low, high = float(bvals.min(initial=0)), float(bvals.max(initial=0))
    return f"{bvals.size} b-values, " + (f"all {_g(low)}" if low == high else f"{_g(low)}–{_g(high)}")


def _diffusion_differences(m: Image, d: Image) -> list[str]:
    """b-values and vectors: compared where both sides have them, described where only one side does."""
    out = []
    for side, (a_val, a_vec), (b_val, b_vec) in (("medtl", (m.bvals, m.bvecs), (d.bvals, d.bvecs)),
                                                  ("dcm2niix", (d.bvals, d.bvecs), (m.bvals, m.bvecs))):
        if (a_val is not None or a_vec is not None) and b_val is None and b_vec is None:
            out.append(f"bval/bvec only in {side} ({_bvals_summary(a_val)})")
    if out:
        return out
    for what, a, b in (("bval", m.bvals, d.bvals), ("bvec", m.bvecs, d.bvecs)):
        if a is None and b is None:
            continue
        if a is None or b is None:
            out.append(f"{what} only in {'medtl' if b is None else 'dcm2niix'}")
        elif a.shape != b.shape:
            out.append(f"{what} shape {_fmt_shape(a.shape)} vs {_fmt_shape(b.shape)}")
        elif what == "bval" and not np.allclose(a, b, rtol=BVAL_RTOL, atol=BVAL_RTOL):
            out.append(f"bval differs (max |Δ| {_g(float(np.abs(a - b).max()))})")
        elif what == "bvec" and not np.allclose(a, b, rtol=0, atol=BVEC_ATOL):
            # a sign flip of one axis is the usual disagreement (which voxel axis is reversed)
            flipped = np.allclose(np.abs(a), np.abs(b), rtol=0, atol=BVEC_ATOL)
            out.append("bvec differs" + (" in sign only" if flipped
                                         else f" (max |Δ| {_g(float(np.abs(a - b).max()))})"))
    return out


def relate(m: Image, d: Image) -> Relation:
    """Compare a medtl file with a dcm2niix file: every difference, and a closeness score for matching."""
    differences: list[str] = []
    if m.tr_s is not None or d.tr_s is not None:
        if m.tr_s is None or d.tr_s is None or not np.isclose(m.tr_s, d.tr_s, rtol=TR_RTOL, atol=0):
            differences.append(f"TR {_g(m.tr_s) if m.tr_s is not None else 'none'} vs "
                               f"{_g(d.tr_s) if d.tr_s is not None else 'none'} s")
    differences += _diffusion_differences(m, d)
    if m.shape == d.shape and same_affine(m, d):
        same_values, notes = _value_differences(m, d)
        score = 0 if same_values and not notes and not differences else 1 if same_values else 2
        return Relation(score, notes + differences)
    layout = layout_map(m, d)
    if layout is not None and len(m.shape) == len(d.shape) and m.shape[3:] == d.shape[3:]:
        moved = _relayout(m.values, *layout)
        if _values_close(moved, d.values):
            perm, flips = layout
            axes = ",".join(("-" if f else "+") + "ijk"[i] for i, f in zip(perm, flips))
            return Relation(3, [f"same voxels, different layout (dcm2niix axes = medtl {axes}; "
                                f"shape {_fmt_shape(m.shape)} vs {_fmt_shape(d.shape)})"] + differences)
    if m.shape != d.shape:
        note = f"shape {_fmt_shape(m.shape)} vs {_fmt_shape(d.shape)}"
        if same_grid(m, d):
            # same 3D grid, different number of volumes: is one a run of the other's volumes?
            (small, s_name), (big, b_name) = sorted([(m, "medtl"), (d, "dcm2niix")], key=lambda x: x[0].volumes)
            offset = volume_offset(small.as_4d(), big.as_4d())
            if offset is not None:
                note += (f"; {s_name}'s {small.volumes} volume{'s' if small.volumes > 1 else ''} = {b_name}'s "
                         f"{_span(offset, small.volumes)} of {big.volumes}")
        elif m.shape[:3] == d.shape[:3]:
            note += f"; affine differs by up to {_g(affine_displacement(m, d))} mm"
        return Relation(5, [note] + differences)
    # same shape, different affine
    displacement = affine_displacement(m, d)
    same_values, notes = _value_differences(m, d)
    return Relation(4 if same_values else 5,
                    [f"affine differs by up to {_g(displacement)} mm (sform max |Δ| "
                     f"{_g(float(np.abs(m.affine - d.affine).max()))})"] + notes + differences)


def affine_displacement(m: Image, d: Image) -> float:
    """Largest distance (mm) between where the two sforms put the corner voxels of medtl's grid."""
    corners = _corners(m.shape)
    return float(np.linalg.norm((m.affine @ corners - d.affine @ corners)[:3], axis=0).max())


def candidate(m: Image, d: Image, relation: Relation) -> bool:
    """Whether ``m`` and ``d`` may be paired: the same series number, or the same grid and values whatever it is."""
    return relation.score <= 1 or (m.series_number is not None and m.series_number == d.series_number)


def _sample_close(m: Image, d: Image, n: int = 4096) -> bool:
    """Same scaled values at ~``n`` evenly strided voxels (same shape assumed)."""
    step = max(1, m.values.size // n)
    return _values_close(m.values.reshape(-1)[::step], d.values.reshape(-1)[::step])


# ----------------------------------------------------------------------------------------------
# matching and the table


@dataclass
class Row:
    """One line of the comparison table.

    Attributes:
        series: the dcm2niix output's name (``%s_%d``), or medtl's series for an extra file.
        medtl: medtl file names (several for a split).
        dcm2niix: dcm2niix file name (``None`` for extra).
        verdict: ``identical at default flags``, ``identical only under FLAGS``, ``different``, ``lost``, ``extra``.
        detail: how they differ, or what else is known.
        category: one of identical, under_flags, different, lost, extra (for the summary).
        flags: the flag sets under which the row is identical (``under_flags`` only).
        number: the series number (for ordering).
    """

    series: str
    medtl: list[str]
    dcm2niix: str | None
    verdict: str
    detail: str
    category: str
    flags: list[str] = field(default_factory=list)
    number: int | None = None


@dataclass
class _Match:
    d: Image
    ms: list[Image]
    detail: str
    identical: bool


def match(medtl: list[Image], dcm: list[Image]) -> tuple[list[_Match], list[Image], list[Image]]:
    """Pair medtl files with dcm2niix files by content.

    Identical and same-value pairs first (one to one), then splits (several medtl files of one series tiling
    one dcm2niix file along axis 3) and merges (the reverse), then the closest remaining pairs.

    Returns:
        (matches, dcm2niix files no medtl file matches, medtl files no dcm2niix file matches)
    """
    relations: dict[tuple[int, int], Relation] = {}
    for i, m in enumerate(medtl):
        for j, d in enumerate(dcm):
            same_number = m.series_number is not None and m.series_number == d.series_number
            # across series numbers only a content match counts; a sample of voxels rules most pairs out
            # before a full comparison (large folders hold many series of one matrix size)
            if same_number or (m.shape == d.shape and same_affine(m, d) and _sample_close(m, d)):
                r = relate(m, d)
                if candidate(m, d, r):
                    relations[i, j] = r
    free_m, free_d = set(range(len(medtl))), set(range(len(dcm)))
    matches: list[_Match] = []

    def greedy(max_score: int) -> None:
        order = sorted(relations.items(), key=lambda kv: (kv[1].score, medtl[kv[0][0]].series_number
                                                          != dcm[kv[0][1]].series_number, kv[0]))
        for (i, j), r in order:
            if r.score <= max_score and i in free_m and j in free_d:
                free_m.discard(i)
                free_d.discard(j)
                matches.append(_Match(dcm[j], [medtl[i]], "; ".join(r.differences), r.identical))

    greedy(1)
    # splits: medtl writes several files where dcm2niix writes one
    for j in sorted(free_d):
        d = dcm[j]
        parts = [i for i in sorted(free_m) if same_grid(medtl[i], d) and medtl[i].volumes < d.volumes
                 and (d.series_number is None or medtl[i].series_number == d.series_number)]
        chain = tiling([medtl[i] for i in parts], d) if len(parts) >= 2 else None
        if chain:
            for part, _ in chain:
                free_m.discard(medtl.index(part))
            free_d.discard(j)
            spans = ", ".join(f"{p.path.name}: {_span(t, p.volumes)}" for p, t in chain)
            matches.append(_Match(d, [p for p, _ in chain], f"split: medtl writes {len(chain)} files where "
                                  f"dcm2niix writes 1 ({spans})", False))
    # merges: medtl writes one file where dcm2niix writes several
    for i in sorted(free_m):
        m = medtl[i]
        parts = [j for j in sorted(free_d) if same_grid(m, dcm[j]) and dcm[j].volumes < m.volumes
                 and (m.series_number is None or dcm[j].series_number == m.series_number)]
        chain = tiling([dcm[j] for j in parts], m) if len(parts) >= 2 else None
        if chain:
            free_m.discard(i)
            for part, t in chain:
                free_d.discard(dcm.index(part))
                matches.append(_Match(part, [m], f"merged: medtl writes 1 file where dcm2niix writes "
                                      f"{len(chain)} (this one is medtl's {_span(t, part.volumes)})",
                                      False))
    greedy(5)
    return matches, [dcm[j] for j in sorted(free_d)], [medtl[i] for i in sorted(free_m)]


def _plain(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def refusals(outcomes: Sequence[SeriesOutcome], d: Image) -> str:
    """Why medtl wrote nothing for dcm2niix's ``d``: its refusals of groups with that series number.

    Series numbers repeat across studies, so groups whose description is also ``d``'s are preferred. Equal
    reasons are counted, not repeated (a localizer is often several 2D groups).
    """
    same_number = [o for o in outcomes if o.status in ("rejected", "not_volume") and o.group is not None
                   and o.group.headers[0].series_number == d.series_number]
    same_name = [o for o in same_number if _plain(o.group.headers[0].series_description) == _plain(d.description)]
    counts: dict[str, int] = {}
    for o in same_name or same_number:
        # rejection reasons start with the group's description, already known from the row
        reason = o.reason.removeprefix(f"{o.group.describe()}: ")
        key = f"{o.status}: {reason}"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{key}" + (f" (×{n} groups)" if n > 1 else "") for key, n in counts.items())


def identical_in(ms: Sequence[Image], variant: Sequence[Image]) -> bool:
    """Whether every medtl file in ``ms`` has an identical file among a variant run's outputs."""
    return all(any(relate(m, v).identical for v in variant
                   if v.shape == m.shape and same_affine(m, v) and _sample_close(m, v)) for m in ms)


def compare(exe: str, input_dir: Path, work: Path) -> tuple[list[Row], dict]:
    """Convert ``input_dir`` with both tools under ``work`` and classify every dcm2niix series.

    Returns:
        The rows (dcm2niix series by series number, then extra medtl files) and facts for the report
        (medtl's outcome counts, dcm2niix's return codes, the variants run).
    """
    outcomes = series_to_nifti(input_files(input_dir), work / "medtl")
    runs = {"default": run_dcm2niix(exe, input_dir, work / "dcm2niix_default")}
    medtl = medtl_images(outcomes)
    dcm = dcm2niix_images(work / "dcm2niix_default")
    matches, lost, extra = match(medtl, dcm)

    rows: dict[str, Row] = {}
    for mt in matches:
        category = IDENTICAL if mt.identical else DIFFERENT
        rows[mt.d.path.name] = Row(mt.d.label, [m.path.name for m in mt.ms], mt.d.path.name,
                                   "identical at default flags" if mt.identical else "different",
                                   mt.detail, category, number=mt.d.series_number)
    for d in lost:
        why = refusals(outcomes, d)
        rows[d.path.name] = Row(d.label, [], d.path.name, "lost", f"lost: no medtl output for dcm2niix's "
                                f"{_fmt_shape(d.shape)}" + (f" (medtl: {why})" if why else ""), LOST,
                                number=d.series_number)
    extra_rows = [Row(m.label, [m.path.name], None, "extra", "extra: no dcm2niix output", EXTRA,
                      number=m.series_number) for m in extra]
    medtl_by_name = {m.path.name: m for m in medtl}

    pending = [r for r in [*rows.values(), *extra_rows] if r.category in (DIFFERENT, EXTRA)]
    variants_run = []
    for flags in VARIANTS if pending else ():
        name = "dcm2niix" + "".join(f.replace("-", "_") for f in flags)
        runs[" ".join(flags)] = run_dcm2niix(exe, input_dir, work / name, flags)
        variants_run.append(" ".join(flags))
        outputs = dcm2niix_images(work / name)
        for row in pending:
            ms = [medtl_by_name[n] for n in row.medtl]
            if identical_in(ms, outputs):
                row.flags.append(" ".join(flags))
        for v in outputs:
            v.release()
    for row in pending:
        if not row.flags:
            continue
        if row.category == DIFFERENT:
            row.category = UNDER_FLAGS
            row.verdict = f"identical only under {row.flags[0]}"
            row.detail = (f"at default: {row.detail}" + (f"; also identical under {', '.join(row.flags[1:])}"
                                                         if row.flags[1:] else ""))
        else:  # extra at default flags stays extra; say which flags would produce it
            row.detail += f"; identical to a dcm2niix output under {', '.join(row.flags)}"

    facts = {
        "medtl_outcomes": {s: sum(o.status == s for o in outcomes)
                           for s in ("written", "rejected", "not_volume", "unreadable")},
        "dcm2niix_returncodes": {k: v.returncode for k, v in runs.items()},
        "variants_run": variants_run,
    }
    # numeric series order (10 after 9), then name
    order = sorted(rows.values(), key=lambda r: (r.number is None, r.number or 0, r.series))
    return order + extra_rows, facts


def summary_line(rows: Sequence[Row]) -> tuple[str, dict]:
    """``N identical at default flags, M only under named flags, K different, L lost, E extra of T dcm2niix series``."""
    counts = {c: sum(r.category == c for r in rows) for c in (IDENTICAL, UNDER_FLAGS, DIFFERENT, LOST, EXTRA)}
    total = len(rows) - counts[EXTRA]
    counts["dcm2niix_series"] = total
    return (f"{counts[IDENTICAL]} identical at default flags, {counts[UNDER_FLAGS]} only under named flags, "
            f"{counts[DIFFERENT]} different, {counts[LOST]} lost, {counts[EXTRA]} extra of {total} dcm2niix series",
            counts)


def print_table(rows: Sequence[Row]) -> None:
    """The rows as a Markdown table (readable in a terminal, pasteable into docs)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    print("| series (dcm2niix) | medtl file | verdict | detail |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {cell(r.series)} | {cell(', '.join(r.medtl) or '-')} | {cell(r.verdict)} | {cell(r.detail or '-')} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", nargs="?", type=Path, default=DEFAULT_INPUT,
                        help="DICOM folder (default: dcm_qa_nih/In)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (0: compare only)")
    parser.add_argument("--dcm2niix", default=None,
                        help="dcm2niix executable (default: next to this Python, else on PATH)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the table and timings as JSON")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the comparison's NIfTI outputs under DIR (default: a temporary folder)")
    args = parser.parse_args()
    if not args.input_dir.is_dir():
        parser.error(f"input folder {args.input_dir} does not exist; pass a DICOM folder")
    if args.repeats < 0:
        parser.error("--repeats must be 0 or more")
    exe = find_dcm2niix(args.dcm2niix)
    version = dcm2niix_version(exe)
    start = time.perf_counter()

    print(f"input: {args.input_dir} ({len(input_files(args.input_dir))} files)")
    print(f"dcm2niix: {exe} ({version})")
    timings = timing(exe, args.input_dir, args.repeats) if args.repeats else None

    if args.keep:
        if args.keep.exists() and any(args.keep.iterdir()):
            parser.error(f"--keep {args.keep} is not empty")
        rows, facts = compare(exe, args.input_dir, args.keep)
    else:
        with tempfile.TemporaryDirectory() as work:
            rows, facts = compare(exe, args.input_dir, Path(work))
    line, counts = summary_line(rows)
    print()
    print(f"comparison: dcm2niix {' '.join(DEFAULT_FLAGS)} vs medtl series_to_nifti "
          f"(medtl: {', '.join(f'{v} {k}' for k, v in facts['medtl_outcomes'].items())}; "
          f"variants run: {', '.join(facts['variants_run']) or 'none needed'})")
    print_table(rows)
    print(line)
    bad_rc = {k: v for k, v in facts["dcm2niix_returncodes"].items() if v}
    if bad_rc:
        print(f"note: dcm2niix exited non-zero ({bad_rc}); its written outputs were compared")
    print(f"total {time.perf_counter() - start:.1f} s")

    if args.json:
        args.json.write_text(json.dumps({
            "input": str(args.input_dir), "dcm2niix": {"path": exe, "version": version,
                                                       "default_flags": list(DEFAULT_FLAGS),
                                                       "variants": [" ".join(v) for v in VARIANTS]},
            "timing": timings, "facts": facts, "summary": {"line": line, **counts},
            "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
