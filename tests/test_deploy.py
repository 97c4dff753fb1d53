"""deploy/, Dockerfile and docker-compose.yml, checked with the tools that run them (no Docker
engine here): hadolint, docker-compose config, promtool, and a real Prometheus server scraping a
live ``ssd serve``."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from test_server import Server, free_port
from test_service import serving, settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (.ci/system-packages installs it)")
    return found


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_serving_image_has_no_torch_and_runs_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    serving = next(s for s in stages if s.split("\n", 1)[0].endswith("AS serving"))
    build = next(s for s in stages if s.split("\n", 1)[0].endswith("AS serving-build"))
    assert "--group serving" in build and "--no-default-groups" in build
    assert "nvidia/cuda" in text and "cudnn-runtime" in text
    assert re.search(r"^USER \d+", serving, flags=re.M)
    assert "HEALTHCHECK" in serving and "/readyz" in serving
    assert re.search(r'^ENTRYPOINT \["ssd", "serve"', serving, flags=re.M)  # exec form
    assert not re.search(r"build-essential|gcc|g\+\+|uv sync", serving)  # no build tools, no installs
    assert text.rstrip().split("\n\n")[-1].count("FROM") <= 1 and stages[-1].startswith(
        "${CUDA_BASE} AS serving"
    )


def test_both_images_copy_what_the_wheel_ships():
    """`ssd` builds every subcommand's parser at start, importing its package: one not copied into
    an image fails every command there (the serving image's first real run had no release/)."""
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"][
        "wheel"
    ]["only-include"]
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.M)
    for name in ("serving-build", "trainer"):
        stage = next(s for s in stages if s.split("\n", 1)[0].endswith(f"AS {name}"))
        copied = {s for line in re.findall(r"^COPY ([^-].*) \S+$", stage, flags=re.M) for s in line.split()}
        assert set(shipped) <= copied, f"{name} does not copy {sorted(set(shipped) - copied)}"


def test_compose_file_is_valid():
    compose = tool("docker-compose")
    for profiles in (["gpu"], ["cpu"], ["cpu", "labelling"], ["train"]):
        chosen = [arg for profile in profiles for arg in ("--profile", profile)]
        result = subprocess.run(
            [compose, "-f", str(ROOT / "docker-compose.yml"), *chosen, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    gpu = services["detector"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["detector-cpu"]["environment"]["SSD_PROVIDERS"] == "cpu"
    assert services["trainer"]["profiles"] == ["train"]
    assert (
        "models:/models" in services["trainer"]["volumes"]
        and "models:/models" in services["detector"]["volumes"]
    )
    assert int(services["detector"]["environment"]["SSD_MODEL_POLL_S"]) > 0  # picks up the retrained model
    # The labelling profile: Label Studio, its images fetched by the detector, the backend wired.
    studio = services["labelstudio"]
    assert studio["profiles"] == ["labelling"] and services["labelling-setup"]["profiles"] == ["labelling"]
    assert studio["environment"]["ML_BLOCK_LOCAL_IP"] == "false"
    assert studio["environment"]["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    assert services["detector"]["environment"]["SSD_LABELSTUDIO_URL"] == "http://labelstudio:8080"
    setup = services["labelling-setup"]["command"]
    assert setup[:2] == ["labelstudio", "connect"] and "http://detector:8000" in setup
    assert "SSD_LABELSTUDIO_PROJECT" in services["trainer"]["environment"]


def test_prometheus_config_and_rules_pass_promtool():
    promtool = tool("promtool")
    for command in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run(
            [promtool, *command], capture_output=True, text=True, cwd=DEPLOY / "prometheus"
        )
        assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {
        "DetectorHighErrorRate",
        "DetectorHighLatencyP99",
        "DetectorQueueSaturated",
        "DetectorModelNotReady",
    } <= names


def used_metric_names() -> set[str]:
    """Every detector_ metric named in the dashboard and the alert rules, histogram suffixes off."""
    texts = [(DEPLOY / "prometheus" / "alerts.yml").read_text()]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "detector.json").read_text())
    texts += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = set()
    for text in texts:
        for name in re.findall(r"\bdetector_[a-z_]+", text):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_every_metric_in_the_dashboard_and_rules_is_exposed(served_artifact):
    async def scrape() -> str:
        async with serving(settings(served_artifact)) as client:
            await client.post("/detect", content=b"x", headers={"Content-Type": "image/jpeg"})
            return (await client.get("/metrics")).text

    text = asyncio.run(scrape())
    exposed = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exposed.add(name)
            if kind == "counter":
                exposed.add(name + "_total")
    used = used_metric_names()
    assert len(used) >= 12
    assert used <= exposed, f"not exposed: {sorted(used - exposed)}"


@pytest.mark.slow
def test_real_prometheus_scrapes_a_live_service(served_artifact, tmp_path):
    prometheus = tool("prometheus")
    server = Server(served_artifact, tmp_path / "server.log")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{server.port}"]
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        up = series = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                up = httpx.get(api, params={"query": 'up{job="detector"}'}, timeout=2).json()["data"][
                    "result"
                ]
                series = httpx.get(api, params={"query": "detector_ready"}, timeout=2).json()["data"][
                    "result"
                ]
            except (httpx.TransportError, KeyError, ValueError):
                pass
            if up and series and up[0]["value"][1] == "1":
                break
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", up
        assert series and series[0]["value"][1] == "1", series
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.stop()
