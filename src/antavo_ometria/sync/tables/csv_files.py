"""The CSV tables analysts edit (`include/mappings/*.csv`): reading them, and saying what is wrong where."""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Iterator
from pathlib import Path

from antavo_ometria.problems import Problem

BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # Excel's "Unicode Text" (tab-separated) starts with one
DELIMITERS = ",;\t"  # comma; semicolon (Excel's CSV where the decimal sign is a comma); tab


def read_csv(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]], list[Problem]]:
    """An analyst-edited CSV: (header, [(line, cells)], problems). UTF-8, with or without Excel's byte-order
    mark (or UTF-16 with its mark, as Excel's "Unicode Text" saves), separated by commas, semicolons or tabs
    as the header row shows; a quote left open is reported on the line where it opens."""
    file = str(path)
    text, problem = _decoded(file, path.read_bytes())
    if problem is not None:
        return None, [], [problem]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter_of(text))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    problems: list[Problem] = []
    start = 1
    for cells in reader:
        if any("\n" in cell or "\r" in cell for cell in cells):
            problems.append(Problem(file, start, "", f"a quote (\") opened on line {start} is not closed before "
                                    f"line {reader.line_num}; close it or remove it"))
        elif header is None:
            header = [h.strip() for h in cells]
        else:
            rows.append((start, cells))
        start = reader.line_num + 1
    return header, rows, problems


def _decoded(file: str, raw: bytes) -> tuple[str, Problem | None]:
    if raw.startswith(UTF16_BOMS):
        try:
            return raw.decode("utf-16"), None
        except UnicodeDecodeError:
            return "", Problem(file, 1, "", "the file starts like UTF-16 but is not; save it as CSV UTF-8")
    raw = raw.removeprefix(BOM)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return "", Problem(file, line, "", f"byte {raw[exc.start]:#x} is not UTF-8; save the file as UTF-8 CSV")


def delimiter_of(text: str) -> str:
    """The separator the header row uses: the one of DELIMITERS it has most of (column names hold none of
    them); a comma when it has none."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def rows_of(file: str, header: list[str], rows: list[tuple[int, list[str]]], problems: list[Problem]
            ) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {column: cell}) of each row that is not blank; a row with the wrong number of cells is a problem."""
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(Problem(file, line, "", f"the row has {len(row)} cells, the header {len(header)}"))
            continue
        yield line, {name: cell.strip() for name, cell in zip(header, row)}


def did_you_mean(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
