FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mem_exporter ./mem_exporter
RUN pip install . \
 && rm -rf /src \
 && useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin mem-exporter

WORKDIR /
# The exporter reads world-readable /proc files and needs no privileges. The
# enforcer sidecar overrides the user and adds CAP_KILL (see deploy/docker-compose.yml).
USER 10001:10001
EXPOSE 9713 9714
ENTRYPOINT ["mem-exporter"]
CMD ["serve"]
