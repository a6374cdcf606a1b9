# One image for every Flywheel component: `flywheel db upgrade`, `serve`, `ingest`, `worker`, `train`.
#   docker build -t flywheel:latest .
# On Linux x86_64, torch==2.13.0 from PyPI is the CUDA build: the same image serves on CPU and on GPU hosts.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# UID/GID 1034 is the user of `bentoml containerize` images too, so both kinds can share the state volume.
RUN groupadd --gid 1034 flywheel \
    && useradd --uid 1034 --gid 1034 --create-home --home-dir /home/flywheel --shell /usr/sbin/nologin flywheel

# WordNet's data files: the thesaurus of synonym augmentation (FLYWHEEL_AUGMENT=synonym), offline.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends wordnet-base \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, against empty packages, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN for package in flywheel service feedback retrain monitoring stack; do \
        mkdir -p "$package" && touch "$package/__init__.py"; \
    done \
    && pip install . \
    && pip uninstall --yes flywheel \
    && rm -rf build ./*.egg-info

COPY flywheel ./flywheel
COPY service ./service
COPY feedback ./feedback
COPY retrain ./retrain
COPY monitoring ./monitoring
# The composition root: the `flywheel` entry point (stack.cli:main) and the seed reviews `init` trains on.
COPY stack ./stack
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# FLYWHEEL_HOME is the shared state volume (registry pointer, model store, holdout, drift reports, spill files).
# BENTOML_HOME stays private to the container (BentoML's Prometheus multiprocess files and temp dirs must not be
# shared between service replicas); only its model store points into the volume, where the registry keeps it.
ENV FLYWHEEL_HOME=/var/lib/flywheel \
    BENTOML_HOME=/home/flywheel/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    FLYWHEEL_SERVE_HOST=0.0.0.0 \
    FLYWHEEL_SERVE_PORT=3000
RUN mkdir -p /var/lib/flywheel/bentoml/models /home/flywheel/bentoml \
    && ln -s /var/lib/flywheel/bentoml/models /home/flywheel/bentoml/models \
    && chown -R flywheel:flywheel /var/lib/flywheel /home/flywheel

USER flywheel
EXPOSE 3000
ENTRYPOINT ["flywheel"]
CMD ["serve"]
