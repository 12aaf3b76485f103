# Relay container image.
#   docker build -t relay:0.1.0 .
# Runs as UID 10001 with a read-only root filesystem; the only writable path it needs is
# /tmp (an emptyDir in Kubernetes), for prometheus-client's multiprocess files.
#
# Reproducible: the base image is pinned by digest (the tag says which release it is; change
# both together, e.g. after `docker buildx imagetools inspect python:3.11.13-slim-bookworm`),
# and every Python package by constraints.txt.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/relay
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
RUN /opt/relay/bin/pip install --constraint constraints.txt . \
 && /opt/relay/bin/python -m compileall -q /opt/relay

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/relay /opt/relay
COPY k8s/base/config.yaml /etc/relay/config.yaml
USER 10001:10001
EXPOSE 8080 9090
# Exec form: python is PID 1 and receives SIGTERM itself, which starts Relay's drain.
ENTRYPOINT ["python", "-m", "service"]
CMD ["--config", "/etc/relay/config.yaml"]
