# The whole service in one container: web, worker and, unless REDIS_URL points
# at a Redis of your own, a private Redis, all started and stopped by launcher.py.
#   docker build -t instagram-webhooks .
#   docker run -p 8000:8000 --env-file .env -v ig-data:/data instagram-webhooks
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DATABASE_PATH=/data/webhooks.db \
    DASHBOARD_HOST=0.0.0.0

# redis-server for the private Redis; tini as PID 1 passes docker stop's
# SIGTERM to the launcher and reaps orphans. Debian's current versions: a pin
# would break the build at every security update of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The code stays root's and read-only; only /data (SQLite and Redis's
# append-only file) belongs to the user the service runs as.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin app \
    && mkdir /data \
    && chown app:app /data
COPY . ./

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "launcher.py", "healthcheck"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "launcher.py"]
