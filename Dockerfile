# The Airflow image for the distributed deployment (docker-compose.yaml): the pinned requirements, then the
# sync's own package (src/), so that DAGs, workers and the dashboard import it like any installed library.
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir -r /requirements.txt
COPY --chown=airflow:root pyproject.toml README.md /opt/antavo-ometria-sync/
COPY --chown=airflow:root src /opt/antavo-ometria-sync/src
RUN pip install --no-cache-dir --no-deps /opt/antavo-ometria-sync
