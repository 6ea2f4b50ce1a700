"""The deployment tests of test_deployment.py on the distributed topology (CeleryExecutor, PostgreSQL, Redis,
staging in a bucket), in a file of its own so that both topologies run side by side."""

from __future__ import annotations

import pytest
import test_deployment as shared

pytestmark = [pytest.mark.airflow, pytest.mark.services]

# the same tests, in the same order (later ones look at the runs of earlier ones), with this file's `stack`
test_contact_sync_runs_on_the_deployment = shared.test_contact_sync_runs_on_the_deployment
test_backfill_resends_the_customers_updated_in_its_intervals = \
    shared.test_backfill_resends_the_customers_updated_in_its_intervals
test_load_killed_with_sigkill_is_retried_by_airflow_without_loss_or_repeats = \
    shared.test_load_killed_with_sigkill_is_retried_by_airflow_without_loss_or_repeats
test_event_sensor_defers_to_the_triggerer_and_resumes = shared.test_event_sensor_defers_to_the_triggerer_and_resumes
test_dashboard_in_the_airflow_ui_shows_real_runs = shared.test_dashboard_in_the_airflow_ui_shows_real_runs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(running Airflow, its own sandbox) on the CeleryExecutor."""
    yield from shared.deployment("celery", tmp_path_factory)
