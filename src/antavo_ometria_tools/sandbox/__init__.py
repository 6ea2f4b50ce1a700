"""A local sandbox of both APIs: real HTTP servers on loopback, strict to the documented contracts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

from antavo_ometria_tools.sandbox.antavo_app import AntavoApp
from antavo_ometria_tools.sandbox.ometria_app import OmetriaApp
from antavo_ometria_tools.sandbox.server import RunningServer

ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT = "sandbox-key", "sandbox-secret", "sandbox"
OMETRIA_KEY = "sandbox-ometria-key"


@dataclass
class Sandbox:
    """Both sandbox servers. `with Sandbox(customers=500) as sb: ...` serves them for the block."""

    customers: int = 200
    seed: int = 7
    ometria_rate: float = 0.0
    antavo_port: int = 0
    ometria_port: int = 0
    state_file: Path | None = None  # keeps both accounts (customers, events, contacts) from one start to the next
    antavo_latency: float = 0.0  # seconds each Antavo request takes (about 0.15 over the internet)

    def __post_init__(self) -> None:
        self.antavo = AntavoApp(ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT, self.customers, self.seed,
                                self.antavo_latency)
        self.ometria = OmetriaApp(OMETRIA_KEY, requests_per_second=self.ometria_rate)
        if self.state_file is not None and self.state_file.exists():
            saved = json.loads(self.state_file.read_text(encoding="utf-8"))
            self.antavo.restore(saved["antavo"])
            self.ometria.restore(saved["ometria"])
        self._servers = [RunningServer(self.antavo, self.antavo_port), RunningServer(self.ometria, self.ometria_port)]

    @property
    def antavo_url(self) -> str:
        return self._servers[0].url

    @property
    def ometria_url(self) -> str:
        return self._servers[1].url

    def connections(self) -> dict[str, str]:
        """`AIRFLOW_CONN_*` environment values (Airflow's JSON form) pointing at this sandbox."""
        return connections(self.antavo_url, self.ometria_url)

    def start(self) -> Sandbox:
        for server in self._servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
        if self.state_file is not None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"antavo": self.antavo.snapshot(), "ometria": self.ometria.snapshot()},
                                                  ensure_ascii=False), encoding="utf-8")

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connections(antavo_url: str, ometria_url: str) -> dict[str, str]:
    """`AIRFLOW_CONN_*` environment values (Airflow's JSON form) pointing at sandbox servers."""
    return {
        "AIRFLOW_CONN_ANTAVO_DEFAULT": json.dumps({
            "conn_type": "http", "host": antavo_url, "login": ANTAVO_KEY, "password": ANTAVO_SECRET,
            "extra": {"environment": ANTAVO_ENVIRONMENT, "read_api_url": antavo_url},
        }),
        "AIRFLOW_CONN_OMETRIA_DEFAULT": json.dumps({"conn_type": "http", "host": ometria_url, "password": OMETRIA_KEY}),
    }


def running(antavo_port: int = 8701, ometria_port: int = 8702) -> dict[str, str] | None:
    """The connections of a sandbox already serving on these ports (`make sandbox`), or None."""
    urls = [f"http://127.0.0.1:{antavo_port}", f"http://127.0.0.1:{ometria_port}"]
    try:
        for url in urls:
            with urlopen(f"{url}/_sandbox/stats", timeout=1) as answer:
                json.load(answer)
    except (OSError, ValueError):
        return None
    return connections(*urls)
