"""Write the decoding table of ``docs/decoding.md``: what medtl's reader makes of every public test file.

The corpus is every regular file that ``pydicom.data.get_testdata_files()`` lists: pydicom's own test
files and those of the ``pydicom-data`` package. Each goes through ``read_dataset`` -> ``validate`` ->
``decode`` -> ``preprocess`` as ingestion would run it, with ``spatial_dims`` 2 for single-frame and 3 for
multi-frame files (so that the table shows what the reader can decode, not one configuration's choice).
The table is written between the ``decode-table`` markers of the document; the prose around it is kept.

Usage::

    .venv/bin/python scripts/decode_table.py          # rewrite the table
    .venv/bin/python scripts/decode_table.py --check  # exit 1 when the committed table is stale
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom.data import get_testdata_files

from medtl.ingest.reader import RejectedFile, decode, preprocess, read_dataset, validate

DOC = Path(__file__).resolve().parents[1] / "docs" / "decoding.md"
START, END = "<!-- decode-table:start -->", "<!-- decode-table:end -->"


@dataclass(frozen=True)
class Row:
    """One file's outcome; ``outcome`` is ``decoded (shape)`` or ``quarantined: reason``."""

    file: str
    transfer_syntax: str
    photometric: str
    frames: str
    outcome: str

    @property
    def decoded(self) -> bool:
        return self.outcome.startswith("decoded")


def corpus_files() -> list[tuple[str, Path]]:
    """(label, path) of every regular file of the public corpus, sorted by label.

    Labels are ``pydicom/<path under test_files>`` or ``pydicom-data/<name>``: stable across machines.
    """
    files = []
    for name in sorted(set(get_testdata_files())):
        path = Path(name)
        if not path.is_file():
            continue
        parts = path.parts
        if "test_files" in parts:
            label = "pydicom/" + "/".join(parts[parts.index("test_files") + 1:])
        else:
            label = "pydicom-data/" + path.name
        files.append((label, path))
    return sorted(files)


def outcome(label: str, path: Path) -> Row:
    """Run one file through the reader as ingestion would.

    Args:
        label: the file's name in the table.
        path: the file.

    Returns:
        Its row; an exception other than ``RejectedFile`` is recorded as ``CRASH ...`` (a bug).
    """
    syntax = photometric = frames = "-"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings about odd files; the outcome says enough
            ds = read_dataset(path)
            syntax = ds.file_meta.TransferSyntaxUID.name
            photometric = str(ds.get("PhotometricInterpretation", "-") or "-")
            frames = str(ds.get("NumberOfFrames", 1) or 1)
            multi = frames.isdigit() and int(frames) > 1
            validate(ds, 3 if multi else 2)
            values = decode(ds)
            preprocess(values, 16)
        result = f"decoded {values.shape}"
    except RejectedFile as exc:
        result = f"quarantined: {exc}"
    except Exception as exc:  # noqa: BLE001 - the table must show it, and the test fails on it
        result = f"CRASH {type(exc).__name__}: {exc}"
    return Row(label, syntax, photometric, frames, result)


def reason_group(reason: str) -> str:
    """A quarantine reason without its particulars (numbers, details after the first colon)."""
    head = reason.removeprefix("quarantined: ").split(":")[0]
    parts = re.split(r"(\([0-9A-Fx]{4,6},[0-9A-Fx]{4,6}\))", head)  # keep DICOM tags as they are
    return "".join(part if i % 2 else re.sub(r"\d+", "N", part) for i, part in enumerate(parts))


def render(rows: list[Row]) -> str:
    """The markdown between the markers: summary, grouped reasons, then one row per file."""
    decoded = sum(r.decoded for r in rows)
    groups = Counter(reason_group(r.outcome) for r in rows if not r.decoded)
    lines = [START, "",
             f"**{len(rows)} files: {decoded} decoded, {len(rows) - decoded} quarantined.**", "",
             "| quarantine reason (grouped) | files |", "|---|---:|"]
    lines += [f"| {_cell(group)} | {n} |" for group, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "| file | transfer syntax | photometric | frames | outcome |", "|---|---|---|---:|---|"]
    lines += [f"| {_cell(r.file)} | {_cell(r.transfer_syntax)} | {_cell(r.photometric)} | {r.frames} | "
              f"{_cell(r.outcome)} |" for r in rows]
    return "\n".join(lines + ["", END])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def updated_document(table: str, document: str) -> str:
    """``document`` with the text between the markers replaced by ``table`` (appended if absent)."""
    if START in document and END in document:
        before, rest = document.split(START, 1)
        return before + table + rest.split(END, 1)[1]
    return document.rstrip("\n") + "\n\n" + table + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/decoding.md is not up to date")
    args = parser.parse_args(argv)
    rows = [outcome(label, path) for label, path in corpus_files()]
    current = DOC.read_text() if DOC.is_file() else "# Decoding\n"
    wanted = updated_document(render(rows), current)
    crashes = [r for r in rows if r.outcome.startswith("CRASH")]
    for row in crashes:
        print(f"{row.file}: {row.outcome}", file=sys.stderr)
    if args.check:
        if wanted != current:
            print(f"{DOC} is stale; run scripts/decode_table.py", file=sys.stderr)
            return 1
        return 1 if crashes else 0
    DOC.write_text(wanted)
    decoded = sum(r.decoded for r in rows)
    print(f"{DOC}: {len(rows)} files, {decoded} decoded, {len(rows) - decoded} quarantined, {len(crashes)} crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
