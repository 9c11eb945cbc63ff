"""The docker-compose file is valid for Docker Compose (no Docker engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml"
SERVICES = {"payment", "restaurant", "rider", "location", "notification"}


def test_compose_config_is_accepted() -> None:
    assert shutil.which("docker"), "the docker CLI (with the compose plugin) is required"
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"

    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert services.keys() >= {"kafka", "jaeger", "coordinator", *SERVICES}
    for name in {"coordinator", *SERVICES}:
        env = services[name]["environment"]
        assert env["SAGA_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert services["coordinator"]["command"][:2] == ["saga", "coordinator"]
    assert services["payment"]["command"][-1] == "services.payment:participant"
    assert services["kafka"]["image"] == "apache/kafka:3.9.2"
    assert services["jaeger"]["image"] == "jaegertracing/jaeger:2.13.0"
