"""The staging folder of a run: the files its steps pass on, and how they are written and read.

The folder is a `pathlib.Path` or, for object storage, an Airflow `ObjectStoragePath`: only operations both
support are used. Customers and the journal are streamed line by line through large buffers.

    customers.ndjson    normalised Antavo customers, one a line (extract)
    contacts.parquet    (id, encoded record, hash) of the contacts to send (transform)
    quarantine.ndjson   customers held back by the quality gate, with every reason; gx_validation.json
    load/*.ndjson       the load journal: per push, ids, payload hashes and Ometria's answer, tagged with the attempt
    report.json         the run report
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CUSTOMERS = "customers.ndjson"
CONTACTS = "contacts.parquet"
QUARANTINE = "quarantine.ndjson"
LOAD_JOURNAL = "load"  # a folder of NDJSON parts, one per push
LEGACY_JOURNAL = "load.ndjson"
READ_BUFFER = 8 << 20
PAGE_BUFFER = 1 << 20  # the load's reads of contacts.parquet
REPORT = "report.json"
GX_RESULT = "gx_validation.json"
DUPLICATES = "duplicate_ids.json"
OVERSIZED = "oversized.ndjson"
INACTIVE = "inactive.ndjson"  # changed customers a profile read found no longer active (extract)
LEAVERS = "leavers.ndjson"  # members who left the programme: removed from the list by the load
DEFERRED = "deferred.ndjson"  # contacts over sync.max_contacts_per_run: owed, the next run sends them
ASYNC_ERRORS = "async_errors.json"
CONTACTS_SCHEMA = pa.schema([("id", pa.string()), ("body", pa.binary()), ("hash", pa.string())])

class Progress:
    """Logs `done/total` with a rate and time left, at most every `every` seconds."""

    def __init__(self, what: str, unit: str, total: int | None = None, every: float = 5.0):
        self.what, self.unit, self.total, self.every = what, unit, total, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            left = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s: %d/%d %s (%.0f/s, ~%.0fs left)", self.what, self.done, self.total, self.unit, rate, left)
        else:
            log.info("%s: %d %s (%.0f/s)", self.what, self.done, self.unit, rate)


def write_ndjson(path: Path, rows) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")
            count += 1
    return count


def read_ndjson(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_customers(staging: Path, pages: Iterable[list[dict]], progress: Progress | None = None
                    ) -> tuple[int, list[str]]:
    """Stage customers as NDJSON, each once: of a customer that comes twice (Antavo's pages shifted while
    they were read), the copy updated last is kept. Returns the count staged and the repeated ids.

    Written in one pass (object storage cannot read back what is still being written); a second pass
    drops the superseded copies, only when there are any."""
    path = staging / CUSTOMERS
    kept: dict[str, tuple[int, object]] = {}  # id → (line of its kept copy, its updated_at)
    dropped: set[int] = set()
    duplicates: list[str] = []
    line = 0
    with path.open("wb") as handle:
        for page in pages:
            for customer in page:
                customer_id = customer.get("id")
                if customer_id is not None and customer_id in kept:
                    duplicates.append(customer_id)
                    earlier, updated = kept[customer_id]
                    if _updated(customer) < _updated({"updated_at": updated}):
                        dropped.add(line)  # the copy already staged is newer
                    else:
                        dropped.add(earlier)
                        kept[customer_id] = (line, customer.get("updated_at"))
                elif customer_id is not None:
                    kept[customer_id] = (line, customer.get("updated_at"))
                handle.write((json.dumps(customer, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
                line += 1
            if progress:
                progress.advance(len(page))
    if progress:
        progress.advance(0, force=True)
    if dropped:
        _drop_lines(path, dropped)
    (staging / DUPLICATES).write_text(json.dumps(sorted(set(duplicates))), encoding="utf-8")
    return line - len(dropped), sorted(set(duplicates))


def _updated(customer: dict) -> datetime:
    try:
        moment = datetime.fromisoformat(str(customer.get("updated_at")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _drop_lines(path: Path, lines: set[int]) -> None:
    """Rewrite `path` without the given lines (0-based)."""
    rewritten = path.with_name(path.name + ".tmp")
    with lines_of(path) as source, rewritten.open("wb") as target:
        for number, line in enumerate(source):
            if number not in lines:
                target.write(line)
    if isinstance(path, Path):
        rewritten.replace(path)  # atomic on a local disk
    else:
        rewritten.rename(path)  # object storage: copied over the old object


def contact_batches(staging: Path, rows: int = 100_000) -> Iterator[list[tuple[str, bytes, str]]]:
    """The staged contacts (id, body, hash), in order, `rows` at a time: the file is never read whole."""
    with (staging / CONTACTS).open("rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(rows):
            yield list(zip(batch.column("id").to_pylist(), batch.column("body").to_pylist(),
                           batch.column("hash").to_pylist(), strict=True))


def read_contacts(staging: Path) -> list[tuple[str, bytes, str]]:
    """Every staged contact (id, body, hash), read batch by batch (no Arrow copy of the whole file beside it)."""
    return [contact for batch in contact_batches(staging) for contact in batch]


def read_rows() -> int:
    """How many staged contacts the load reads at a time: $ANTAVO_OMETRIA_LOAD_READ_ROWS, default 2,000 (their
    bodies, about 1 KB each, are released before the next are read)."""
    value = os.environ.get("ANTAVO_OMETRIA_LOAD_READ_ROWS", "").strip() or "2000"
    if not (value.isdigit() and int(value) >= 1):
        raise ValueError(f"ANTAVO_OMETRIA_LOAD_READ_ROWS must be a whole number of contacts, at least 1; it is {value!r}")
    return int(value)


@dataclass(frozen=True)
class StagedIndex:
    """The staged contacts without their bodies, row for row in the file's order: ids, payload hashes and body
    sizes in Arrow and numpy arrays (a few dozen bytes a contact), for the load to decide on before it reads the
    bodies it sends."""

    ids: pa.StringArray
    hashes: pa.StringArray
    sizes: np.ndarray  # bytes of each encoded body

    def __len__(self) -> int:
        return len(self.ids)

    def among(self, ids: Iterable[str]) -> np.ndarray:
        """Which rows have one of these ids (a boolean mask)."""
        return _mask(pc.is_in(self.ids, value_set=pa.array(list(ids), pa.string())))

    def pairs_among(self, pairs: Iterable[tuple[str, str]]) -> np.ndarray:
        """Which rows are one of these (id, hash) pairs (a boolean mask)."""
        keys = pc.binary_join_element_wise(self.ids, self.hashes, "\n")
        return _mask(pc.is_in(keys, value_set=pa.array([f"{i}\n{h}" for i, h in pairs], pa.string())))

    def pairs_at(self, positions: np.ndarray) -> list[tuple[str, str]]:
        """(id, hash) of the rows at these positions, in their order."""
        taken = pa.array(positions, pa.int64())
        return list(zip(self.ids.take(taken).to_pylist(), self.hashes.take(taken).to_pylist(), strict=True))


def _mask(flags: pa.Array) -> np.ndarray:
    return flags.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def staged_count(staging: Path) -> int:
    """How many contacts are staged (from the file's footer: nothing is read)."""
    with (staging / CONTACTS).open("rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def contact_index(staging: Path, rows: int | None = None) -> StagedIndex:
    """The staged contacts' ids, hashes and body sizes, the bodies read `rows` at a time and let go."""
    ids, hashes, sizes = [], [], []
    with (staging / CONTACTS).open("rb") as handle:
        for batch in _streamed(handle).iter_batches(rows or read_rows(), use_threads=False):
            ids.append(batch.column("id"))
            hashes.append(batch.column("hash"))
            sizes.append(pc.binary_length(batch.column("body")).to_numpy(zero_copy_only=False))
    pa.default_memory_pool().release_unused()  # the bodies' pages, kept by the allocator for reuse otherwise
    return StagedIndex(pa.concat_arrays(ids) if ids else pa.array([], pa.string()),
                       pa.concat_arrays(hashes) if hashes else pa.array([], pa.string()),
                       np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64))


def contacts_at(staging: Path, positions: np.ndarray, rows: int | None = None
                ) -> Iterator[list[tuple[str, bytes, str]]]:
    """The staged contacts (id, body, hash) at these row positions, in the order given, a read batch of `rows`
    at a time: one pass over the file for each stretch of increasing positions (row groups without any skipped)."""
    positions = np.asarray(positions, np.int64)
    breaks = np.flatnonzero(np.diff(positions) <= 0) + 1
    for stretch in np.split(positions, breaks):
        if len(stretch):
            yield from _increasing(staging, stretch, rows or read_rows())


def _increasing(staging: Path, positions: np.ndarray, rows: int) -> Iterator[list[tuple[str, bytes, str]]]:
    with (staging / CONTACTS).open("rb") as handle:
        parquet = _streamed(handle)
        start = 0
        for group in range(parquet.num_row_groups):
            if start > positions[-1]:
                return
            end = start + parquet.metadata.row_group(group).num_rows
            if np.searchsorted(positions, start) < np.searchsorted(positions, end):  # some of its rows are wanted
                for batch in parquet.iter_batches(rows, row_groups=[group], use_threads=False):
                    yield from _picked(batch, positions, start)
                    start += batch.num_rows
            start = end


def _streamed(handle) -> pq.ParquetFile:
    """The staged contacts file, its pages read as they are decoded (not a row group's columns at once)."""
    return pq.ParquetFile(handle, pre_buffer=False, buffer_size=PAGE_BUFFER)


def _picked(batch: pa.RecordBatch, positions: np.ndarray, start: int) -> Iterator[list[tuple[str, bytes, str]]]:
    low, high = np.searchsorted(positions, [start, start + batch.num_rows])
    if high > low:
        taken = batch.take(pa.array(positions[low:high] - start, pa.int64()))
        yield list(zip(taken.column("id").to_pylist(), taken.column("body").to_pylist(),
                       taken.column("hash").to_pylist(), strict=True))


def first_bodies(staging: Path, count: int) -> list[bytes]:
    """The bodies of the first `count` staged contacts."""
    bodies: list[bytes] = []
    with (staging / CONTACTS).open("rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(count, columns=["body"]):
            bodies += batch.column("body").to_pylist()[:count - len(bodies)]
            if len(bodies) == count:
                break
    return bodies


def staging_dir(root: Path, dag_id: str, run_id: str) -> Path:
    """One folder per run: the run id made safe for a file name, plus a digest of the exact id, so that
    run ids differing only in punctuation (`manual__12:00` and `manual__12_00`) never share a folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return root / dag_id / f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def staging_retention() -> timedelta:
    """How long run folders are kept: $ANTAVO_OMETRIA_STAGING_RETENTION_DAYS, default 7 days."""
    return timedelta(days=float(os.environ.get("ANTAVO_OMETRIA_STAGING_RETENTION_DAYS") or 7))


def prune_staging(root: Path, dag_id: str, keep: Path, older_than: timedelta | None = None) -> list[Path]:
    """Delete the DAG's run folders untouched for longer than the retention (never `keep`); return them.

    Staged files hold full customer profiles; the state store keeps what outlives them (what was sent,
    what is held back and why). Works the same on a local folder and on object storage."""
    cutoff = time.time() - (older_than if older_than is not None else staging_retention()).total_seconds()
    removed = []
    folder_of_dag = root / dag_id
    if not folder_of_dag.exists():
        return removed
    for folder in sorted(folder_of_dag.iterdir(), key=str):
        if folder.is_dir() and str(folder) != str(keep) and _last_change(folder) < cutoff:
            if isinstance(folder, Path):
                shutil.rmtree(folder, ignore_errors=True)
            else:  # object storage
                folder.rmdir(recursive=True)
            removed.append(folder)
    return removed


def _last_change(folder: Path) -> float:
    """When anything in the folder, or below it (the load journal), last changed."""
    if isinstance(folder, Path):
        return max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.rglob("*") if f.is_file())])
    # object storage keeps a time per object, not per folder: one listing gives them all
    found = folder.fs.find(folder.path, detail=True)
    return max((_seconds(info) for info in found.values()), default=0.0)


def _seconds(info: dict) -> float:
    moment = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
    return moment.timestamp() if hasattr(moment, "timestamp") else float(moment)


def make_folder(folder: Path) -> None:
    """A folder on a local disk (a path, or a `file://` URL) is created; on object storage a folder is only a
    key prefix (and creating one could create a bucket that should be reported missing)."""
    if isinstance(folder, Path) or getattr(folder, "protocol", None) in ("file", "local"):
        folder.mkdir(parents=True, exist_ok=True)


class Journal:
    """The load journal: one NDJSON part per push (object storage cannot append to an object, and each push
    must be on record before the next is made). Parts are numbered in the order they are written, whatever
    the clocks of the workers that wrote them; one try of a task runs at a time."""

    def __init__(self, staging: Path):
        self.folder = staging / LOAD_JOURNAL
        self.next = len(_parts(self.folder))

    def append(self, entries: list[dict]) -> None:
        if entries:
            make_folder(self.folder)
            write_ndjson(self.folder / f"{self.next:07d}-{uuid.uuid4().hex[:6]}.ndjson", entries)
            self.next += 1


def _parts(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.name.endswith(".ndjson")), key=lambda p: p.name) \
        if folder.exists() else []


def read_journal(staging: Path) -> list[dict]:
    """Every entry of the load journal, in the order they were written (after those of a journal kept in one
    file, as releases before the parts did)."""
    parts = _parts(staging / LOAD_JOURNAL)
    if parts and hasattr(parts[0], "fs"):  # object storage: fetch the parts concurrently
        blobs = parts[0].fs.cat([p.path for p in parts])
        texts = [blobs[key] for key in sorted(blobs)]
    else:
        texts = [p.read_bytes() for p in parts]
    return read_ndjson(staging / LEGACY_JOURNAL) + [
        json.loads(line) for text in texts for line in text.splitlines() if line.strip()]


@contextmanager
def lines_of(path: Path) -> Iterator[Iterator[bytes]]:
    """The lines of a staged file, read through a large buffer: on object storage a file read line by line
    would fetch (and copy) a whole block for every line."""
    with path.open("rb") as raw, io.BufferedReader(raw, buffer_size=READ_BUFFER) as buffered:
        yield iter(buffered)
