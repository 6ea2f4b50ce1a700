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

from antavo_ometria.sync.staging import make_folder

VARIABLE = "ANTAVO_OMETRIA_STAGING_DIR"


class StagingUnusable(Exception):
    """The staging location cannot be written (a missing bucket, refused credentials): no run can stage its files."""

    retryable = False


def staging_root():
    """The staging location: a `pathlib.Path`, or an `ObjectStoragePath` for a URL."""
    value = os.environ.get(VARIABLE) or str(Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow") / "staging")
    if "://" not in value:
        return Path(value)
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
    except Exception as exc:  # fsspec backends raise their own kinds (botocore, google-auth, OSError)
        raise StagingUnusable(f"staging {shown(root)} is not usable: {type(exc).__name__}: {str(exc).rstrip('.')}. Check the bucket "
                              f"and the connection named in {VARIABLE}") from None
    return f"files can be staged at {shown(root)}"


def shown(root) -> str:
    """The staging location as configured (an object storage URL keeps its connection id, never a secret)."""
    value = os.environ.get(VARIABLE)
    return value if value and "://" in value else str(root)
