"""The Dockerfile (no Docker engine here to build it): what it copies exists, and it agrees with the settings."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from bentoml._internal.container.generate import BENTO_UID_GID

from flywheel.settings import Settings
from tests.deploy.conftest import REPO_ROOT, dockerfile_env

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def dockerignored() -> set[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_copied_paths_exist_and_are_in_the_build_context() -> None:
    copies = [arguments.split() for keyword, arguments in instructions() if keyword == "COPY"]
    sources = [source for *paths, _ in copies for source in paths]
    assert sources
    ignored = dockerignored()
    for source in sources:
        assert (REPO_ROOT / source).exists(), source
        assert source not in ignored, f"{source} is excluded by .dockerignore"
    # Every package pyproject installs is copied, and the installed packages are exactly those.
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources)
    # The dependency layer installs against empty stand-ins of the same packages.
    stubs = next(arguments for keyword, arguments in instructions() if "for package in" in arguments)
    assert set(stubs.partition("for package in")[2].partition(";")[0].split()) == packages


def test_image_runs_the_flywheel_command_as_an_unprivileged_user() -> None:
    steps = instructions()
    values: dict[str, Any] = {keyword: arguments for keyword, arguments in steps}
    assert values["FROM"] == "python:3.11-slim"
    assert ">=3.11" in PYPROJECT["project"]["requires-python"]
    assert json.loads(values["ENTRYPOINT"]) == ["flywheel"]
    assert "flywheel" in PYPROJECT["project"]["scripts"]
    assert values["USER"] not in ("root", "0")
    # The same UID as BentoML's images, so a containerized Bento can share the state volume.
    useradd = next(arguments for keyword, arguments in steps if keyword == "RUN" and "useradd" in arguments)
    assert f"--uid {BENTO_UID_GID} --gid {BENTO_UID_GID}" in useradd
    assert useradd.split()[-1] == values["USER"]


def test_environment_matches_the_settings_and_the_compose_file(resolved: dict[str, Any]) -> None:
    env = dockerfile_env()
    fields = set(Settings.model_fields)
    flywheel_keys = {key for key in env if key.startswith("FLYWHEEL_")}
    assert flywheel_keys
    assert {key.removeprefix("FLYWHEEL_").lower() for key in flywheel_keys} <= fields
    values: dict[str, Any] = {key.removeprefix("FLYWHEEL_").lower(): env[key] for key in flywheel_keys}
    settings = Settings(**values)
    assert settings.serve_host == "0.0.0.0"
    for service in ("db-init", "init", "service", "ingest", "worker"):
        assert resolved["services"][service]["environment"]["FLYWHEEL_HOME"] == env["FLYWHEEL_HOME"]

    # BENTOML_HOME is private to the container, but its model store is the registry's default place in the state
    # volume (<FLYWHEEL_HOME>/bentoml/models), so a state directory from `flywheel up` works as is.
    bentoml_home = Path(env["BENTOML_HOME"])
    assert not bentoml_home.is_relative_to(settings.home)
    store = settings.bentoml_home / "models"
    run = " ".join(arguments for keyword, arguments in instructions() if keyword == "RUN")
    assert f"ln -s {store} {bentoml_home / 'models'}" in run
    assert f"mkdir -p {store}" in run
