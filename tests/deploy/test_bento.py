"""`bentoml build` from the repository root: a Bento with the service's sources, the model and the requirements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from flywheel.broker import EmbeddedBroker
from flywheel.registry import MODEL_NAME, ModelRegistry
from flywheel.settings import Settings
from tests.conftest import copy_home, running_service
from tests.deploy.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PACKAGES = ("flywheel", "service", "feedback", "retrain", "monitoring", "stack")


@dataclass
class BuiltBento:
    tag: str
    path: Path
    env: dict[str, str]
    champion: str


def bentoml_env(home: Path) -> dict[str, str]:
    """The environment of a BentoML command whose store and model store are the Flywheel home's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "BENTOML_"))}
    return {**env, "FLYWHEEL_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}


def bentoml(*args: str, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def built(trained_home: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> BuiltBento:
    """`bentoml build` run as an operator would, with the registry's model store as BentoML's."""
    home = Path(copy_home(trained_home, tmp_path_factory.mktemp("bento") / "home")["FLYWHEEL_HOME"])
    env = bentoml_env(home)
    result = bentoml("build", "--output", "tag", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    champion = ModelRegistry(Settings(home=home)).champion()
    assert champion is not None
    return BuiltBento(tag=tag, path=home / "bentoml" / "bentos" / name / version, env=env, champion=champion)


def bento_manifest(built: BuiltBento) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((built.path / "bento.yaml").read_text())
    return manifest


def test_bento_holds_every_package_file_and_nothing_else(built: BuiltBento) -> None:
    src = built.path / "src"
    shipped = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    expected = {
        p.relative_to(REPO_ROOT).as_posix()
        for package in PACKAGES
        for p in (REPO_ROOT / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    # Migrations, alembic.ini and the seed data are not Python files but the service needs them.
    assert {
        "flywheel/database/alembic.ini", "flywheel/database/migrations/script.py.mako", "stack/data/seed_reviews.csv"
    } <= expected
    assert expected <= shipped, f"missing from the Bento: {sorted(expected - shipped)}"
    extra = shipped - expected - {"pyproject.toml", "README.md", "bentofile.yaml"}
    assert not extra, f"unexpected files in the Bento: {sorted(extra)[:20]}"

    manifest = bento_manifest(built)
    assert manifest["service"] == "service.service:TextClassifier"
    assert manifest["name"] == "flywheel"


def test_bento_references_the_trained_model(built: BuiltBento) -> None:
    models = [model["tag"] for model in bento_manifest(built)["models"]]
    assert models == [f"{MODEL_NAME}:{built.champion}"]


def test_bento_installs_the_project_with_its_pinned_requirements(built: BuiltBento) -> None:
    import bentoml as bentoml_package

    requirements = (built.path / "env" / "python" / "requirements.txt").read_text().splitlines()
    # "." is the Bento's src/, whose pyproject.toml brings every dependency.
    assert requirements[0] == "."
    assert "torch==2.13.0" in requirements
    assert "pandas>=2.1,<3" in requirements
    assert f"bentoml=={bentoml_package.__version__}" in requirements
    shipped = tomllib.loads((built.path / "src" / "pyproject.toml").read_text())
    assert shipped == tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_bentofile_pins_agree_with_pyproject() -> None:
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [package for package in bentofile["python"]["packages"] if package != "."]
    assert pins, "the bentofile pins torch and pandas"
    assert set(pins) <= set(dependencies)


def test_bento_container_mounts_state_where_the_registry_reads_it(built: BuiltBento) -> None:
    dockerfile = (built.path / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "ARG FLYWHEEL_HOME=/home/bentoml/flywheel" in dockerfile
    assert "ENV BENTOML_HOME=/home/bentoml/" in dockerfile
    # The setup script runs at image build time and links $BENTOML_HOME/models into the state volume,
    # where ModelRegistry keeps its store by default (<FLYWHEEL_HOME>/bentoml/models).
    scripts = list((built.path / "env" / "docker").glob("script__*"))
    assert len(scripts) == 1
    assert f"./env/docker/{scripts[0].name}" in dockerfile
    script = scripts[0].read_text()
    assert script == (REPO_ROOT / "deploy" / "bento_setup.sh").read_text()
    expected_store = Settings(home=Path("/home/bentoml/flywheel")).bentoml_home / "models"
    assert f"ln -sfn {expected_store} /home/bentoml/models" in script
    assert subprocess.run(["sh", "-n", str(scripts[0])], check=False).returncode == 0


def test_bentoml_lists_the_bento(built: BuiltBento) -> None:
    result = bentoml("list", "--output", "json", env=built.env)
    assert result.returncode == 0, result.stderr
    assert built.tag in {entry["tag"] for entry in json.loads(result.stdout)}


@pytest.fixture()
def bento_server(built: BuiltBento, broker: EmbeddedBroker, tmp_path: Path) -> Iterator[str]:
    """`bentoml serve TAG` of the built Bento, from a directory outside the checkout."""
    env = {**built.env, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
    with running_service(env, target=built.tag, cwd=tmp_path) as url:
        yield url


def test_built_bento_serves_the_champion(built: BuiltBento, bento_server: str) -> None:
    answer = httpx.post(f"{bento_server}/predict", json={"text": "a great and excellent film"}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == built.champion
    assert body["predictions"][0]["label"] == "positive"
    model = httpx.get(f"{bento_server}/model", timeout=10).json()
    assert model["version"] == built.champion
