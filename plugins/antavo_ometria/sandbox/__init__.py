"""A local sandbox of both APIs: real HTTP servers on loopback, strict to the documented contracts."""

from __future__ import annotations

import json
from dataclasses import dataclass

from antavo_ometria.sandbox.antavo_app import AntavoApp
from antavo_ometria.sandbox.ometria_app import OmetriaApp
from antavo_ometria.sandbox.server import RunningServer

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

    def __post_init__(self) -> None:
        self.antavo = AntavoApp(ANTAVO_KEY, ANTAVO_SECRET, ANTAVO_ENVIRONMENT, self.customers, self.seed)
        self.ometria = OmetriaApp(OMETRIA_KEY, requests_per_second=self.ometria_rate)
        self._servers = [RunningServer(self.antavo, self.antavo_port), RunningServer(self.ometria, self.ometria_port)]

    @property
    def antavo_url(self) -> str:
        return self._servers[0].url

    @property
    def ometria_url(self) -> str:
        return self._servers[1].url

    def connections(self) -> dict[str, str]:
        """`AIRFLOW_CONN_*` environment values (Airflow's JSON form) pointing at this sandbox."""
        return {
            "AIRFLOW_CONN_ANTAVO_DEFAULT": json.dumps({
                "conn_type": "http", "host": self.antavo_url, "login": ANTAVO_KEY, "password": ANTAVO_SECRET,
                "extra": {"environment": ANTAVO_ENVIRONMENT, "read_api_url": self.antavo_url},
            }),
            "AIRFLOW_CONN_OMETRIA_DEFAULT": json.dumps({
                "conn_type": "http", "host": self.ometria_url, "password": OMETRIA_KEY,
            }),
        }

    def start(self) -> Sandbox:
        for server in self._servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
