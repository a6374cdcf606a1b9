"""docker-compose.yml: valid for Docker Compose, started in the right order, wired to the real settings and topics."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flywheel.events import Topic
from flywheel.settings import Settings
from tests.conftest import free_port
from tests.deploy.conftest import REPO_ROOT, REQUIRED_VARIABLES, dockerfile_env, run_compose

INFRASTRUCTURE = {"kafka", "kafka-init", "postgres"}
FLYWHEEL_SERVICES = {"db-init", "keys-init", "init", "service", "ingest", "worker"}
ONE_SHOT = {"kafka-init", "db-init", "keys-init", "init"}
GPU_SERVICE = "service-gpu"


def flywheel_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the Flywheel image, GPU variant included."""
    return {name: service for name, service in config["services"].items() if name in FLYWHEEL_SERVICES | {GPU_SERVICE}}


def test_compose_accepts_the_file_with_and_without_the_gpu_profile() -> None:
    default = run_compose("config", "--services")
    assert default.returncode == 0, default.stderr
    assert set(default.stdout.split()) == INFRASTRUCTURE | FLYWHEEL_SERVICES

    gpu = run_compose("--profile", "gpu", "config", "--services")
    assert gpu.returncode == 0, gpu.stderr
    assert set(gpu.stdout.split()) == INFRASTRUCTURE | FLYWHEEL_SERVICES | {GPU_SERVICE}


def test_compose_refuses_to_start_without_the_secrets() -> None:
    # One variable missing at a time: compose reports the first missing one it meets, in no fixed order.
    for missing in ("FLYWHEEL_ADMIN_TOKEN", "POSTGRES_PASSWORD", "FLYWHEEL_ADMIN_KEY_FILE"):
        refused = run_compose("config", variables={k: v for k, v in REQUIRED_VARIABLES.items() if k != missing})
        assert refused.returncode != 0, missing
        assert f"set {missing}" in refused.stderr, refused.stderr


def test_the_first_admin_key_comes_from_a_secret_before_anything_serves(resolved: dict[str, Any]) -> None:
    keys = resolved["services"]["keys-init"]
    assert keys["command"][:5] == ["keys", "create", "admin", "--role", "admin"]
    assert "--if-missing" in keys["command"]
    secret = keys["command"][keys["command"].index("--key-file") + 1]
    assert secret == "/run/secrets/flywheel_admin_key"
    assert [s["source"] for s in keys["secrets"]] == ["flywheel_admin_key"]
    assert resolved["secrets"]["flywheel_admin_key"]["file"] == REQUIRED_VARIABLES["FLYWHEEL_ADMIN_KEY_FILE"]
    for name in ("service", "ingest", "worker"):
        assert resolved["services"][name]["depends_on"]["keys-init"]["condition"] == "service_completed_successfully"
    # Binding every interface is safe only because a key exists before the service starts.
    assert resolved["services"]["service"]["environment"]["FLYWHEEL_SERVE_HOST"] == "0.0.0.0"


def test_every_long_running_service_has_a_healthcheck_and_restarts(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        if name in ONE_SHOT:
            assert service["restart"] == "no", name
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert service["restart"] == "unless-stopped", name


def test_start_order_waits_for_health_or_completion(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert rule["condition"] == expected, f"{name} -> {dependency}"
            if expected == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}, which has none"

    assert set(services["kafka-init"]["depends_on"]) == {"kafka"}
    assert set(services["db-init"]["depends_on"]) == {"postgres"}
    for name in ("service", GPU_SERVICE, "ingest", "worker"):
        assert set(services[name]["depends_on"]) >= INFRASTRUCTURE | {"db-init"}, name
    # Serving and retraining need the first champion; ingestion does not.
    for name in ("service", GPU_SERVICE, "worker"):
        assert "init" in services[name]["depends_on"], name
    assert "init" not in services["ingest"]["depends_on"]


def test_flywheel_containers_share_one_image_and_the_state_volume(resolved: dict[str, Any]) -> None:
    images = set()
    for name, service in flywheel_services(resolved).items():
        images.add(service["image"])
        assert Path(service["build"]["context"]) == REPO_ROOT, name
        assert service["build"]["dockerfile"] == "Dockerfile", name
        mounts = {mount["source"]: mount["target"] for mount in service["volumes"] if mount["type"] == "volume"}
        assert mounts == {"flywheel-state": service["environment"]["FLYWHEEL_HOME"]}, name
    assert len(images) == 1

    services = resolved["services"]
    postgres_mounts = {m["source"]: m["target"] for m in services["postgres"]["volumes"]}
    assert postgres_mounts == {"postgres-data": "/var/lib/postgresql/data"}
    kafka_mounts = {m["source"]: m["target"] for m in services["kafka"]["volumes"]}
    assert kafka_mounts == {"kafka-data": services["kafka"]["environment"]["KAFKA_LOG_DIRS"]}
    assert {"flywheel-state", "postgres-data", "kafka-data"} <= set(resolved["volumes"])


def test_environment_keys_are_settings_fields_with_valid_values(resolved: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name, service in flywheel_services(resolved).items():
        flywheel_env = {k: v for k, v in service["environment"].items() if k.startswith("FLYWHEEL_")}
        unknown = {k for k in flywheel_env if k.removeprefix("FLYWHEEL_").lower() not in fields}
        assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"
        settings = Settings(**{k.removeprefix("FLYWHEEL_").lower(): v for k, v in flywheel_env.items()})
        assert settings.resolved_database_url == (
            f"postgresql+psycopg://flywheel:{REQUIRED_VARIABLES['POSTGRES_PASSWORD']}@postgres:5432/flywheel"
        )
        assert settings.kafka_bootstrap == "kafka:9092"
        assert settings.admin_token is not None
        assert settings.admin_token.get_secret_value() == REQUIRED_VARIABLES["FLYWHEEL_ADMIN_TOKEN"]
        assert settings.api_keys == []
        assert settings.log_json

    postgres = resolved["services"]["postgres"]["environment"]
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]) == ("flywheel", "flywheel")
    assert postgres["POSTGRES_PASSWORD"] == REQUIRED_VARIABLES["POSTGRES_PASSWORD"]


def test_api_keys_pass_through_to_the_settings() -> None:
    result = run_compose("config", "--format", "json", variables={**REQUIRED_VARIABLES, "FLYWHEEL_API_KEYS": "k1,k2"})
    assert result.returncode == 0, result.stderr
    environment = json.loads(result.stdout)["services"]["service"]["environment"]
    settings = Settings(api_keys=environment["FLYWHEEL_API_KEYS"])
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]


def test_kafka_is_a_single_kraft_node_that_flywheel_can_reach(resolved: dict[str, Any]) -> None:
    kafka = resolved["services"]["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@localhost:9093"
    assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"]
    # A KRaft cluster id is a base64url UUID: 16 bytes.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    bootstraps = {s["environment"]["FLYWHEEL_KAFKA_BOOTSTRAP"] for s in flywheel_services(resolved).values()}
    assert {f"PLAINTEXT://{address}" for address in bootstraps} == {env["KAFKA_ADVERTISED_LISTENERS"]}
    assert kafka["healthcheck"]["test"][1].startswith(
        "/opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 --list"
    )


def test_kafka_init_creates_exactly_the_event_topics(resolved: dict[str, Any]) -> None:
    kafka_init = resolved["services"]["kafka-init"]
    specs = dict(spec.split(":") for spec in kafka_init["environment"]["TOPICS"].split())
    assert set(specs) == {topic.value for topic in Topic}
    assert all(int(partitions) >= 1 for partitions in specs.values())
    script = kafka_init["command"][0]
    assert "TOPICS" in script
    assert "--create --if-not-exists" in script
    # With auto-creation off, a topic exists only if kafka-init made it.
    assert resolved["services"]["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_gpu_profile_is_the_service_with_an_nvidia_gpu(resolved: dict[str, Any]) -> None:
    service = resolved["services"]["service"]
    gpu = resolved["services"][GPU_SERVICE]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert "profiles" not in service
    assert "deploy" not in service
    shared = ("image", "command", "environment", "volumes", "depends_on", "healthcheck", "init")
    assert {key: gpu[key] for key in shared} == {key: service[key] for key in shared}
    published = {s["ports"][0]["published"] for s in (service, gpu)}
    assert len(published) == 2, "both services publish the same host port"


def test_healthchecks_probe_the_ports_the_processes_listen_on(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    serve_port = dockerfile_env()["FLYWHEEL_SERVE_PORT"]
    for name in ("service", GPU_SERVICE):
        assert f"http://127.0.0.1:{serve_port}/readyz" in services[name]["healthcheck"]["test"][-1]
        assert str(services[name]["ports"][0]["target"]) == serve_port
    ingest = services["ingest"]
    metrics_port = ingest["environment"]["FLYWHEEL_INGEST_METRICS_PORT"]
    assert f"http://127.0.0.1:{metrics_port}/metrics" in ingest["healthcheck"]["test"][-1]
    assert services["worker"]["command"] == ["worker"]
    assert services["ingest"]["command"] == ["ingest"]
    assert services["service"]["command"] == ["serve"]


def test_db_init_migrates_the_database_before_anything_uses_it(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    db_init = services["db-init"]
    # The image's entry point is `flywheel`: this is `flywheel db upgrade`, the one process that migrates.
    assert db_init["image"] == services["service"]["image"]
    assert db_init["command"] == ["db", "upgrade"]
    assert db_init.get("entrypoint") is None
    assert db_init["restart"] == "no"
    assert {name: rule["condition"] for name, rule in db_init["depends_on"].items()} == {"postgres": "service_healthy"}
    for name in ("service", GPU_SERVICE, "ingest", "worker"):
        assert services[name]["depends_on"]["db-init"]["condition"] == "service_completed_successfully", name
    # Nothing else may migrate: the long-running components only check the schema.
    for name, service in flywheel_services(resolved).items():
        if name != "db-init":
            assert "upgrade" not in " ".join(service.get("command") or []), name


def test_db_upgrade_is_a_command_of_the_entry_point() -> None:
    from typer.testing import CliRunner

    from stack.cli import app

    result = CliRunner().invoke(app, ["db", "upgrade", "--help"])
    assert result.exit_code == 0, result.output
    assert "migration" in result.output


def init_check(resolved: dict[str, Any]) -> str:
    """The Python one-liner `init` runs to decide whether a champion exists."""
    script = resolved["services"]["init"]["command"][0]
    match = re.search(r"python -c '([^']+)'", script)
    assert match, script
    return match.group(1)


@pytest.mark.slow
def test_init_trains_only_when_the_registry_has_no_champion(
    resolved: dict[str, Any], trained_home: dict[str, str], tmp_path: Path
) -> None:
    check = init_check(resolved)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "BENTOML_"))}
    empty_home = {**env, "FLYWHEEL_HOME": str(tmp_path / "empty")}
    empty = subprocess.run([sys.executable, "-c", check], check=False, env=empty_home)
    assert empty.returncode == 1, "an empty registry must be trained"
    trained = subprocess.run([sys.executable, "-c", check], check=False, env={**env, **trained_home})
    assert trained.returncode == 0, "a registry with a champion must be kept"

    init = resolved["services"]["init"]
    assert "flywheel train --data" in init["command"][0] and "--promote" in init["command"][0]
    # The seed file ships in the image: the Dockerfile copies stack/ to /app/stack.
    seed = Path(init["environment"]["SEED_DATA"])
    assert seed.is_relative_to("/app")
    assert (REPO_ROOT / seed.relative_to("/app")).is_file()


def run_health(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=30).returncode


@pytest.mark.slow
def test_worker_healthcheck_fails_once_the_worker_dies(resolved: dict[str, Any], tmp_path: Path) -> None:
    code = resolved["services"]["worker"]["healthcheck"]["test"][-1]
    assert code.count("'/proc/1'") == 1, code
    flywheel = Path(sys.executable).parent / "flywheel"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "BENTOML_"))}
    env.update({"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    # As in the stack, `db-init` has migrated the database before the worker starts.
    subprocess.run([str(flywheel), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([str(flywheel), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # The check reads the process table entry, as the container's PID 1 is the worker.
        probe = code.replace("'/proc/1'", f"'/proc/{worker.pid}'")
        deadline = time.monotonic() + 60
        while "retrain worker started" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert run_health(probe) == 0

        worker.send_signal(signal.SIGKILL)
        # Killed but not yet reaped: a zombie, which the check must call unhealthy.
        while Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.05)
        assert run_health(probe) == 1
        worker.wait(10)
        assert run_health(probe) == 1

    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        probe = code.replace("'/proc/1'", f"'/proc/{other.pid}'")
        assert run_health(probe) == 1, "the check must recognise the worker, not any live process"
    finally:
        other.kill()
        other.wait(10)
