"""Where runs stage their files: a local folder, or object storage through Airflow's `ObjectStoragePath`.

`ANTAVO_OMETRIA_STAGING_DIR` is either a local path (the default: `$AIRFLOW_HOME/staging`) or a URL:
`file:///opt/airflow/staging`, `s3://aws_default@bucket/prefix`, `gs://google_cloud_default@bucket/prefix`.
As everywhere in Airflow, the URL's user part names the Connection that holds the credentials (and, for an
S3-compatible service, its `endpoint_url`). Workers on different machines then share a run through the bucket.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from antavo_ometria.sync.contacts.staged_files import make_folder

VARIABLE = "ANTAVO_OMETRIA_STAGING_DIR"


class StagingUnusable(Exception):
    """The staging location cannot be written: no run can stage its files. Not `retryable` when a retry cannot
    help (a missing bucket, refused credentials); a network error or an outage is retried."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def staging_root():
    """The staging location: a `pathlib.Path`, or an `ObjectStoragePath` for a URL."""
    value = os.environ.get(VARIABLE) or str(Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow") / "staging")
    if "://" not in value:
        return Path(value)
    url = urlsplit(value)
    if url.password is not None:  # it would be shown in logs, reports and alerts
        raise ValueError(f"{VARIABLE} must not hold credentials: put them in an Airflow Connection and name its id "
                         "in the URL (s3://<connection id>@bucket/prefix)")
    if url.scheme == "file" and url.netloc:
        raise ValueError(f"{VARIABLE}: a file URL takes an absolute path, file:///path (three slashes), "
                         f"not {value!r}")
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(value)


def check_staging(root) -> str:
    """Write, read back and delete a small object at the staging location; raise StagingUnusable saying why not."""
    probe = root / f".probe-{uuid.uuid4().hex[:8]}"
    try:
        make_folder(root)
        probe.write_text("antavo-ometria-sync")
        if probe.read_text() != "antavo-ometria-sync":
            raise OSError("what was written could not be read back")
        probe.unlink()
    except Exception as exc:  # fsspec backends raise their own kinds (botocore, OSError)
        # a missing bucket or folder, or refused credentials, stay so; anything else (the network) may pass
        lasting = isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError))
        raise StagingUnusable(f"staging {shown(root)} is not usable: {type(exc).__name__}: {str(exc).rstrip('.')}. "
                              f"Check the bucket and the connection named in {VARIABLE}", retryable=not lasting) from None
    return f"files can be staged at {shown(root)}"


def shown(root) -> str:
    """The staging location as configured (an object storage URL keeps its connection id, never a secret)."""
    value = os.environ.get(VARIABLE)
    return value if value and "://" in value else str(root)
