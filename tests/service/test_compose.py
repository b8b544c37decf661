"""The compose stack and the Dockerfile: structure (always, with PyYAML) and ``compose config``.

No Docker engine runs in CI, so nothing is built or started here: the structural tests check
what ``docker compose up`` relies on (Redis AOF and healthcheck, start order gated on the
healthcheck, the API's command and environment, the GPU reservation), and the validation test
runs the compose client's own ``config`` (``docker compose`` plugin, else ``docker-compose``)
where one is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def test_base_file_has_redis_api_worker() -> None:
    services = _load(BASE)["services"]
    assert set(services) == {"redis", "api", "worker"}


def test_redis_is_redis7_with_aof_and_ping_healthcheck() -> None:
    redis = _load(BASE)["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = _command(redis)
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    test = redis["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "redis-cli" in test[1:][0] and "ping" in test
    # The AOF must outlive the container.
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert set(_load(BASE)["volumes"]) >= {str(redis["volumes"][0]).split(":")[0]}


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_services_wait_for_healthy_redis(name: str) -> None:
    service = _load(BASE)["services"][name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    env = service["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert "KERNELSCOPE_TOKEN" in env and "${KERNELSCOPE_TOKEN" in env["KERNELSCOPE_TOKEN"]


def test_api_serves_on_all_interfaces_without_worker() -> None:
    api = _load(BASE)["services"]["api"]
    command = _command(api)
    assert command[:2] == ["kernelscope", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--no-worker" in command
    port = command[command.index("--port") + 1]
    assert any(str(p).endswith(f":{port}") for p in api["ports"])


def test_worker_runs_the_worker_command() -> None:
    worker = _load(BASE)["services"]["worker"]
    assert _command(worker)[:2] == ["kernelscope", "worker"]
    # No fixed container_name or host port: `--scale worker=N` must be possible.
    assert "container_name" not in worker and "ports" not in worker


def test_gpu_override_reserves_an_nvidia_gpu_for_the_worker() -> None:
    override = _load(GPU)["services"]
    assert set(override) == {"worker"}
    worker = override["worker"]
    command = _command(worker)
    assert command[:2] == ["kernelscope", "worker"]
    assert command[command.index("--device") + 1] == "cuda"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_dockerfile_pins_torch_from_a_build_arg_index() -> None:
    text = DOCKERFILE.read_text()
    assert text.startswith("#") and re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=$", text, re.M), "the index's default is the user's"
    assert '"torch==${TORCH_VERSION}"' in text and '--index-url "$TORCH_INDEX_URL"' in text
    # torch is installed before the project so that `pip install .` keeps that build.
    assert text.index("torch==${TORCH_VERSION}") < text.index("RUN pip install .")


def test_the_image_copies_every_file_the_build_reads() -> None:
    """``pip install .`` in the image reads the readme and the licence file that
    ``pyproject.toml`` names; a file missing from the ``COPY`` lines fails the build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    copied = {
        name
        for line in re.findall(r"^COPY (.+) \S+$", DOCKERFILE.read_text(), re.M)
        for name in line.split()
    }
    needed = {"pyproject.toml", project["readme"], *project.get("license-files", [])}
    assert needed <= copied, sorted(needed - copied)


def test_no_registry_host_names_in_deployment_files() -> None:
    """The index URL is always the user's: no host names of package registries are written."""
    host = re.compile(r"https?://(?!127\.0\.0\.1|localhost|redis[:/])", re.I)
    for path in (BASE, GPU, DOCKERFILE, ROOT / ".dockerignore"):
        assert not host.search(path.read_text()), path.name


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


@pytest.mark.parametrize("files", [[BASE], [BASE, GPU]], ids=["base", "base+gpu"])
def test_compose_config_validates(files: list[Path], tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    args = [*compose, "--project-directory", str(ROOT)]
    for path in files:
        args += ["-f", str(path)]
    env = {**os.environ, "KERNELSCOPE_TOKEN": "t0ken", "HOME": str(tmp_path)}
    result = subprocess.run(
        [*args, "config"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert merged["services"]["api"]["environment"]["KERNELSCOPE_TOKEN"] == "t0ken"
    worker_cmd = _command(merged["services"]["worker"])
    assert worker_cmd[-1] == ("cuda" if GPU in files else "auto")
