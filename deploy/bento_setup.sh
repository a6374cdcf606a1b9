#!/bin/sh
# Runs as root while `bentoml containerize` builds the image, after the `bentoml` user exists.
# The state volume is mounted at FLYWHEEL_HOME=/home/bentoml/flywheel. The registry keeps its model store at
# $BENTOML_HOME/models (BENTOML_HOME=/home/bentoml in Bento images), so that path points into the volume, while
# BentoML's per-container runtime files (Prometheus multiprocess dir, tmp) stay out of the shared volume.
set -eu
mkdir -p /home/bentoml/flywheel/bentoml/models
ln -sfn /home/bentoml/flywheel/bentoml/models /home/bentoml/models
chown -R bentoml:bentoml /home/bentoml/flywheel
chown -h bentoml:bentoml /home/bentoml/models
