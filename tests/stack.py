"""A real Airflow deployment for tests: api-server, scheduler, dag-processor, triggerer and an executor.

`AirflowStack.local(tmp)` is Airflow's embedded default (SQLite, LocalExecutor, SimpleAuthManager, as `make ui`);
`AirflowStack.celery(...)` is the distributed one of docker-compose.yaml (PostgreSQL metadata database, Redis
broker, CeleryExecutor worker, the FAB auth manager with the admin its airflow-init creates). Each component runs
in its own process group and is stopped with it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from antavo_ometria.airflow import sqlite_metadata

PROJECT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
HEALTH = {"scheduler": "scheduler", "triggerer": "triggerer", "dag-processor": "dag_processor"}
POLL = 0.25  # seconds between looks at the deployment while waiting for it: a wait ends soon after its condition


def compose_init_script() -> str:
    """The shell script docker-compose.yaml's airflow-init runs, as its shell gets it (compose turns $$ into $)."""
    command = yaml.safe_load((PROJECT / "docker-compose.yaml").read_text())["services"]["airflow-init"]["command"]
    assert command[:2] == ["bash", "-c"], command
    return command[2].replace("$$", "$")


def compose_secrets(home: Path) -> dict[str, str]:
    """What docker compose gives airflow-init from the `.env` that `make keys` writes: every variable of its
    environment set from a name in that file (the Fernet key, the JWT and API secrets, the admin's login)."""
    import re

    dotenv = home / ".env"
    subprocess.run(["make", "-s", "keys", f"KEYS_FILE={dotenv}"], cwd=PROJECT, check=True, capture_output=True)
    values = dict(line.split("=", 1) for line in dotenv.read_text().splitlines() if "=" in line)
    init = yaml.safe_load((PROJECT / "docker-compose.yaml").read_text())["services"]["airflow-init"]["environment"]
    named = {key: re.fullmatch(r"\$\{(\w+)(?::[-?][^}]*)?\}", str(value)) for key, value in init.items()}
    return {key: values[m.group(1)] for key, m in named.items() if m and m.group(1) in values}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowStack:
    def __init__(self, home: Path, env: dict[str, str], components: list[str], fab: bool = False):
        self.home = home
        self.fab = fab  # the FAB auth manager, prepared by compose's airflow-init; else SimpleAuthManager
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (home / "passwords.json").write_text('{"admin": "admin"}')
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            # the scheduler's pause between loops that found nothing to do (1 s by default): the next task of a run
            # is queued within a fifth of a second of the last one ending
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            **({"AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER, **compose_secrets(home),
                "_AIRFLOW_WWW_USER_EMAIL": "admin@example.com",
                "PATH": os.pathsep.join([str(Path(AIRFLOW).parent), os.environ.get("PATH", "")])} if fab else {}),
            **env,
        }
        self.login = ({"username": self.env["_AIRFLOW_WWW_USER_USERNAME"], "password": self.env[
            "_AIRFLOW_WWW_USER_PASSWORD"]} if fab else {"username": "admin", "password": "admin"})
        self.components = components
        self.processes: list[subprocess.Popen] = []
        self.token = ""

    @classmethod
    def local(cls, home: Path, env: dict[str, str]) -> AirflowStack:
        return cls(home, {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", **sqlite_metadata.SETTING, **env},
                   ["api-server", "scheduler", "dag-processor", "triggerer"])

    @classmethod
    def api_server(cls, home: Path, env: dict[str, str]) -> AirflowStack:
        """The api-server alone, with the FAB auth manager, on SQLite: enough to ask it who may read what."""
        return cls(home, {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", **sqlite_metadata.SETTING, **env},
                   ["api-server"], fab=True)

    @classmethod
    def celery(cls, home: Path, env: dict[str, str], database_url: str, broker_url: str) -> AirflowStack:
        return cls(home, {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
            **env,
        }, ["api-server", "scheduler", "dag-processor", "triggerer", "celery worker --concurrency 2"], fab=True)

    # -- life cycle --------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return done.stdout

    def start(self, timeout: float = 150) -> AirflowStack:
        if self.fab:  # what docker compose's airflow-init does, for real
            done = subprocess.run(["bash", "-c", compose_init_script()], env=self.env, capture_output=True, text=True,
                                  timeout=400)
            (self.home / "airflow-init.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                raise RuntimeError(f"airflow-init failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        else:
            self.run("db", "migrate", timeout=300)
            self.run("pools", "set", "ometria_push", "1", "Ometria push API: account-wide rate limit")
        for component in self.components:
            self.processes.append(self._launch(component, "w"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).json()
                started = ["metadatabase", *(HEALTH[c] for c in self.components if c in HEALTH)]
                if all(health.get(c, {}).get("status") == "healthy" for c in started):
                    break
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(POLL)
        else:
            raise TimeoutError(f"Airflow did not become healthy in {timeout}s; logs in {self.home}")
        self.token = self.token_for(**self.login)
        return self

    def token_for(self, username: str, password: str) -> str:
        """An API token from the auth manager's login endpoint (POST /auth/token, with FAB or SimpleAuthManager)."""
        answer = requests.post(f"{self.url}/auth/token", json={"username": username, "password": password}, timeout=30)
        answer.raise_for_status()
        return answer.json()["access_token"]

    def _launch(self, component: str, mode: str) -> subprocess.Popen:
        log = (self.home / f"{component.split()[0]}.log").open(mode)
        command = [AIRFLOW, *component.split()] + (["--port", str(self.port)] if component == "api-server" else [])
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def stop_component(self, name: str) -> None:
        """Stop one component (its whole process group), as a crash or a redeploy would."""
        process = self.processes[self.components.index(name)]
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def start_component(self, name: str) -> None:
        self.processes[self.components.index(name)] = self._launch(name, "a")

    def _check_alive(self) -> None:
        for component, process in zip(self.components, self.processes):
            if process.poll() is not None:
                raise RuntimeError(f"airflow {component} exited ({process.returncode}); log: "
                                   + (self.home / f"{component.split()[0]}.log").read_text()[-3000:])

    def stop(self) -> None:
        """Stop the components that run tasks first, the api-server last: a task still running can report its end
        to the api-server instead of retrying against a closed port until the scheduler's shutdown gives up."""
        serving = [p for c, p in zip(self.components, self.processes) if c == "api-server"]
        self._stop_all([p for p in self.processes if p not in serving], grace=20)
        self._stop_all(serving, grace=10)

    @staticmethod
    def _stop_all(processes: list[subprocess.Popen], grace: float) -> None:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)

    # -- REST API ------------------------------------------------------------------------------
    def api(self, method: str, path: str, **kwargs) -> dict:
        for attempt in range(10):  # SQLite answers 503 while another component holds its write lock
            response = requests.request(method, f"{self.url}/api/v2{path}", timeout=30,
                                        headers={"Authorization": f"Bearer {self.token}"}, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        response.raise_for_status()
        return response.json() if response.content else {}

    def wait_for_dag(self, dag_id: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except requests.HTTPError:
                self._check_alive()
                time.sleep(POLL)
        raise TimeoutError(f"{dag_id} was not parsed within {timeout}s")

    def unpause(self, dag_id: str) -> None:
        self.wait_for_dag(dag_id)
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, logical_date: str, conf: dict | None = None) -> str:
        self.unpause(dag_id)
        body = {"logical_date": logical_date, "conf": conf or {}}
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def wait_for_run(self, dag_id: str, until, timeout: float = 120) -> str:
        """The id of the first run of `dag_id` whose task states satisfy `until`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for run in self.api("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]:
                if until(self.task_states(dag_id, run["dag_run_id"])):
                    return run["dag_run_id"]
            self._check_alive()
            time.sleep(POLL)
        raise TimeoutError(f"no run of {dag_id} reached the expected state within {timeout}s")

    def failure_logs(self, dag_id: str, run_id: str) -> dict[str, str]:
        """The end of the log of every failed task of a run, for assertion messages."""
        logs = {}
        for task, state in self.task_states(dag_id, run_id).items():
            if state in ("failed", "upstream_failed"):
                files = sorted((self.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task}/*.log"))
                logs[task] = files[-1].read_text()[-1500:] if files else state
        return logs

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        rows = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {row["task_id"]: row["state"] for row in rows}

    def wait_for_state(self, dag_id: str, run_id: str, timeout: float = 180, until=None) -> str:
        """Wait until the run ends (or `until(task_states)` is true); return the run's state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if until is not None and until(self.task_states(dag_id, run_id)):
                return state
            if until is None and state in ("success", "failed"):
                return state
            self._check_alive()
            time.sleep(POLL)
        raise TimeoutError(f"{dag_id} {run_id}: {self.task_states(dag_id, run_id)} after {timeout}s")
