# One image for all six services; compose.yaml chooses the service with `command`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY ops/ ops/
COPY services/ services/

RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin cdp \
    && mkdir -p /data /secrets \
    && for s in ingest identity profile segmentation scheduler destination; do \
         mkdir -p "/secrets/$s"; done \
    && chown -R cdp:cdp /data /secrets

ENV CDP_DATA_DIR=/data \
    CDP_BIND=0.0.0.0 \
    CDP_LOG_FORMAT=json

# Created and owned by `cdp` before VOLUME, so a fresh named volume inherits the owner
# (/secrets: the NKey seeds that compose's `secrets` job writes, mode 0600).
VOLUME ["/data", "/secrets"]
USER cdp

EXPOSE 8081 8082 8083 8084 8085 8086
CMD ["python", "-m", "services.ingest"]
