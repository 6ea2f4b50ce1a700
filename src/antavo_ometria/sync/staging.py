"""The staging folder of a run: the files its steps pass on, and how they are written and read.

    customers.ndjson    normalised Antavo customers, one a line (extract)
    contacts.parquet    (id, encoded record, hash) of the contacts to send (transform)
    quarantine.ndjson   customers held back by the quality gate, with every reason; gx_validation.json
    load.ndjson         one line per push: ids, payload hashes and Ometria's answer, tagged with the run attempt
    report.json         the run report
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

CUSTOMERS = "customers.ndjson"
CONTACTS = "contacts.parquet"
QUARANTINE = "quarantine.ndjson"
LOAD_JOURNAL = "load.ndjson"
REPORT = "report.json"
GX_RESULT = "gx_validation.json"
DUPLICATES = "duplicate_ids.json"
OVERSIZED = "oversized.ndjson"
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


def write_ndjson(path: Path, rows, mode: str = "w") -> int:
    count = 0
    with path.open(mode, encoding="utf-8") as handle:
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
    they were read), the copy updated last is kept. Returns the count staged and the repeated ids."""
    path = staging / CUSTOMERS
    offsets: dict[str, int] = {}  # id → where its kept copy starts
    dropped: set[int] = set()
    duplicates: list[str] = []
    with path.open("wb") as handle:
        for page in pages:
            for customer in page:
                line = (json.dumps(customer, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                customer_id = customer.get("id")
                if customer_id is not None and customer_id in offsets:
                    duplicates.append(customer_id)
                    handle.flush()
                    earlier = offsets[customer_id]
                    if _updated(customer) >= _updated(_read_line(path, earlier)):
                        dropped.add(earlier)
                    else:
                        dropped.add(handle.tell())
                        handle.write(line)
                        continue
                if customer_id is not None:
                    offsets[customer_id] = handle.tell()
                handle.write(line)
            if progress:
                progress.advance(len(page))
    if progress:
        progress.advance(0, force=True)
    count = _drop_lines(path, dropped)
    (staging / DUPLICATES).write_text(json.dumps(sorted(set(duplicates))), encoding="utf-8")
    return count, sorted(set(duplicates))


def _updated(customer: dict) -> datetime:
    try:
        moment = datetime.fromisoformat(str(customer.get("updated_at")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _read_line(path: Path, offset: int) -> dict:
    with path.open("rb") as handle:
        handle.seek(offset)
        return json.loads(handle.readline())


def _drop_lines(path: Path, offsets: set[int]) -> int:
    """Rewrite `path` without the lines starting at `offsets`; return the lines kept."""
    kept = 0
    with path.open("rb") as source, path.with_suffix(".tmp").open("wb") as target:
        while True:
            offset = source.tell()
            line = source.readline()
            if not line:
                break
            if offset not in offsets:
                target.write(line)
                kept += 1
    path.with_suffix(".tmp").replace(path)
    return kept


def read_contacts(staging: Path) -> list[tuple[str, bytes, str]]:
    table = pq.read_table(staging / CONTACTS)
    return list(zip(table.column("id").to_pylist(), table.column("body").to_pylist(),
                    table.column("hash").to_pylist()))


def staging_root() -> Path:
    """Where runs stage their files: $ANTAVO_OMETRIA_STAGING_DIR, else $AIRFLOW_HOME/staging."""
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return Path(os.environ.get("ANTAVO_OMETRIA_STAGING_DIR") or Path(airflow_home) / "staging")


def staging_dir(dag_id: str, run_id: str) -> Path:
    """One folder per run: the run id made safe for a file name, plus a digest of the exact id, so that
    run ids differing only in punctuation (`manual__12:00` and `manual__12_00`) never share a folder."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return staging_root() / dag_id / f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def staging_retention() -> timedelta:
    """How long run folders are kept: $ANTAVO_OMETRIA_STAGING_RETENTION_DAYS, default 7 days."""
    return timedelta(days=float(os.environ.get("ANTAVO_OMETRIA_STAGING_RETENTION_DAYS") or 7))


def prune_staging(dag_id: str, keep: Path, older_than: timedelta | None = None) -> list[Path]:
    """Delete the DAG's run folders untouched for longer than the retention (never `keep`); return them.

    Staged files hold full customer profiles; the state store keeps what outlives them (what was sent,
    what is held back and why)."""
    cutoff = time.time() - (older_than if older_than is not None else staging_retention()).total_seconds()
    removed = []
    for folder in sorted((staging_root() / dag_id).glob("*")):
        if folder.is_dir() and folder.resolve() != keep.resolve() and _last_change(folder) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _last_change(folder: Path) -> float:
    return max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
