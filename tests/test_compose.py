"""docker-compose.yaml describes the tested distributed topology (it cannot run here: no Docker engine)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init")


def compose() -> dict:
    return yaml.safe_load((PROJECT / "docker-compose.yaml").read_text())


def test_services_of_the_celery_topology():
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", *AIRFLOW_SERVICES, "minio", "minio-init"}
    assert services["airflow-worker"]["command"] == "celery worker"
    assert services["airflow-triggerer"]["command"] == "triggerer"  # deferrable sensors wait here
    for name, service in services.items():
        if name not in ("airflow-init", "minio-init"):  # one-off setup jobs
            assert "healthcheck" in service and service["healthcheck"]["test"], f"{name} has no healthcheck"


def test_airflow_services_share_one_configuration():
    services = compose()["services"]
    env = services["airflow-scheduler"]["environment"]
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert services[name]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == env[
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    for conn in ("AIRFLOW_CONN_ANTAVO_DEFAULT", "AIRFLOW_CONN_OMETRIA_DEFAULT", "AIRFLOW_CONN_ANTAVO_OMETRIA_STATE"):
        assert conn in env


def test_the_ui_wants_a_login_from_the_auth_manager_the_deployment_tests_run():
    """FAB, as in Airflow's own compose file; SimpleAuthManager is for development (`make ui`). The real logins
    against it are tests/test_ui_access.py and the CeleryExecutor deployment tests, which run the same init."""
    from stack import FAB_AUTH_MANAGER

    services = compose()["services"]
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["AIRFLOW__CORE__AUTH_MANAGER"] == FAB_AUTH_MANAGER
    pinned = (PROJECT / "requirements.txt").read_text()
    assert re.search(r"^apache-airflow-providers-fab==", pinned, re.M)  # in the image: it installs requirements.txt
    init = services["airflow-init"]
    script = init["command"][2]
    assert init["command"][:2] == ["bash", "-c"] and "entrypoint" not in init  # the image's: it waits for the database
    assert "--role Admin" in script and '--username="$${_AIRFLOW_WWW_USER_USERNAME}"' in script
    assert '--password="$${_AIRFLOW_WWW_USER_PASSWORD}"' in script
    password = re.fullmatch(r"\$\{(\w+):\?([^}]+)\}", init["environment"]["_AIRFLOW_WWW_USER_PASSWORD"])
    assert password and password.group(1) == "_AIRFLOW_WWW_USER_PASSWORD" and "make keys" in password.group(2)


def test_the_ui_is_published_on_this_machine_only_unless_asked():
    (published,) = compose()["services"]["airflow-apiserver"]["ports"]
    address = re.fullmatch(r"\$\{(\w+):-([\d.]+)\}:8080:8080", published)
    assert address and address.group(2) == "127.0.0.1", published
    for name, service in compose()["services"].items():
        assert name == "airflow-apiserver" or "ports" not in service, f"{name} publishes a port"
    assert f"{address.group(1)}=0.0.0.0" in (PROJECT / "README.md").read_text()  # how to ask otherwise


def test_project_files_and_shared_staging_are_mounted():
    services = compose()["services"]
    for name in AIRFLOW_SERVICES:
        volumes = services[name]["volumes"]
        for folder in ("dags", "plugins", "include"):
            assert f"./{folder}:/opt/airflow/{folder}" in volumes
        assert "staging:/opt/airflow/staging" in volumes
    assert services["airflow-worker"]["environment"]["ANTAVO_OMETRIA_STAGING_DIR"] == "${STAGING_URL:-/opt/airflow/staging}"
    assert "staging" in compose()["volumes"]


def test_the_object_storage_variant_stages_in_a_bucket_its_init_creates():
    """`STAGING_URL=s3://minio_staging@antavo-ometria-staging/runs docker compose --profile object-storage up`
    (the README's command): the URL's connection reaches the MinIO service, whose init creates that bucket."""
    import json

    services = compose()["services"]
    readme = (PROJECT / "README.md").read_text()
    url = re.search(r"STAGING_URL=(s3://(\w+)@([\w-]+)/\S*) docker compose --profile object-storage up", readme)
    assert url, "the README shows how to start the object-storage variant"
    conn_id, bucket = url.group(2), url.group(3)
    env = compose()["x-airflow-common"]["environment"]
    conn = json.loads(env[f"AIRFLOW_CONN_{conn_id.upper()}"])
    assert conn["conn_type"] == "aws" and conn["login"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    # the connection's password is MinIO's own, from the variable `make keys` writes
    assert conn["password"] == "${MINIO_ROOT_PASSWORD:-}" == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert "MINIO_ROOT_PASSWORD" in (PROJECT / "Makefile").read_text()
    assert conn["extra"]["endpoint_url"] == "http://minio:9000"  # the service name, MinIO's API port
    for name in ("minio", "minio-init"):
        assert services[name]["profiles"] == ["object-storage"]
    init = " ".join(services["minio-init"]["command"])
    assert f"mc mb --ignore-existing staging/{bucket}" in init and "http://minio:9000" in init


def test_init_creates_the_push_pool_and_the_image_uses_the_pinned_requirements():
    init = " ".join(compose()["services"]["airflow-init"]["command"])
    assert "airflow db migrate" in init and "airflow pools set ometria_push" in init
    assert "python -m antavo_ometria.airflow.migrate" in init  # the state store's schema, once per deployment
    dockerfile = (PROJECT / "Dockerfile").read_text()
    pinned = re.search(r"^apache-airflow==(\S+)", (PROJECT / "requirements.txt").read_text(), re.M).group(1)
    assert f"apache/airflow:{pinned}-python3.11" in dockerfile
    assert "pip install --no-cache-dir -r /requirements.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps /opt/antavo-ometria-sync" in dockerfile  # the sync's package, from src/


def test_no_usable_default_secret_ships():
    """Compose refuses to start without a JWT secret and a Fernet key, and says how to make them."""
    env = compose()["x-airflow-common"]["environment"]
    for name, variable in (("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_JWT_SECRET"),
                           ("AIRFLOW__API__SECRET_KEY", "AIRFLOW_API_SECRET_KEY"),
                           ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW_FERNET_KEY")):
        required = re.fullmatch(r"\$\{(\w+):\?([^}]+)\}", env[name])
        assert required and required.group(1) == variable and "make keys" in required.group(2), env[name]


def test_make_keys_writes_working_secrets_once(tmp_path):
    import base64
    import subprocess

    target = tmp_path / ".env"
    make = ["make", "-s", "keys", f"KEYS_FILE={target}"]
    first = subprocess.run(make, cwd=PROJECT, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == f"wrote {target}: docker compose reads it"
    values = dict(line.split("=", 1) for line in target.read_text().splitlines())
    assert len(values["AIRFLOW_JWT_SECRET"]) == 64 and len(values["AIRFLOW_API_SECRET_KEY"]) == 64
    assert values["_AIRFLOW_WWW_USER_USERNAME"] == "airflow" and len(values["_AIRFLOW_WWW_USER_PASSWORD"]) >= 20
    assert len(base64.urlsafe_b64decode(values["AIRFLOW_FERNET_KEY"])) == 32  # a Fernet key
    again = subprocess.run(make, cwd=PROJECT, capture_output=True, text=True, check=True)
    assert "exists: keeping its keys" in again.stdout and dict(
        line.split("=", 1) for line in target.read_text().splitlines()) == values
