"""The Antavo sandbox serving a benchmark population, with a network's latency: run as its own process.

    python -m benchmarks.antavo_server --customers bench-data/customers-1000000/customers.ndjson \
        --latency 0.15 --changed 12000 --changed-at 2045-01-01T00:30:00+00:00 --port 8801

The customers are the staged ones (what the sync wrote from this very API), given their Read API id back.
Every (population / changed)-th customer gets a new first name and `updated_at` = --changed-at.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from datetime import datetime
from pathlib import Path

from antavo_ometria_tools.sandbox import ANTAVO_ENVIRONMENT, ANTAVO_KEY, ANTAVO_SECRET
from antavo_ometria_tools.sandbox.antavo_app import AntavoApp
from antavo_ometria_tools.sandbox.server import RunningServer


def load(path: Path) -> list[dict]:
    customers = []
    with path.open("rb") as handle:
        for line in handle:
            customer = json.loads(line)
            customer["_id"] = customer.pop("id")
            customers.append(customer)
    return customers


def changed_ids(size: int, changed: int) -> list[str]:
    """The ids the server changes: spread evenly over the population."""
    step = max(1, size // changed) if changed else 0
    return [f"c{i:08d}" for i in range(0, size, step)][:changed] if changed else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.15)
    parser.add_argument("--changed", type=int, default=0)
    parser.add_argument("--changed-at", type=datetime.fromisoformat)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = AntavoApp(ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT, customers=0, latency=args.latency)
    app.customers = load(args.customers)
    for customer_id in changed_ids(len(app.customers), args.changed):
        app.touch(customer_id, {"first_name": f"{app.by_id[customer_id]['first_name']} Jr"}, at=args.changed_at)
    RunningServer(app, args.port).start()
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # at once: freeing a million customers takes a while
    threading.Event().wait()


if __name__ == "__main__":
    main()
