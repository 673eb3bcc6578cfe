# The Switchyard image: the control plane (`switchyard serve`, the default command) and the
# vLLM simulator (`python -m controlplane sim ...`, what simulator VLLMModel pods run).
#   docker build -t switchyard:0.1.0 .
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN pip install . \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin switchyard

USER 10001:10001
EXPOSE 9000 18000 8000
ENTRYPOINT ["switchyard"]
CMD ["serve", "--config", "/etc/switchyard/switchyard.yaml"]
