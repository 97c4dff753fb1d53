"""A real Label Studio for the tests: its server from PyPI (make labelstudio-env), started on a
loopback port with its own SQLite database in a temporary folder, a user with a legacy token,
and the few calls of its REST API the tests make (as its own SDK makes them)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from live import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / ".venv" / "labelstudio" / "bin" / "label-studio"
TOKEN = "5f3c2a1b0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"  # the user's legacy token (40 hex digits)


@dataclass
class Studio:
    url: str
    api: httpx.Client
    log: Path
    _pat: str | None = None

    def personal_access_token(self) -> str:
        """The user's personal access token (a JWT refresh token), made at the first call: Label
        Studio keeps one per user (a second POST /api/token/ is 409)."""
        if self._pat is None:
            answer = self.api.post("/api/token/")
            answer.raise_for_status()
            self._pat = answer.json()["token"]
        return self._pat

    def project(self, title: str, label_config: str) -> int:
        answer = self.api.post("/api/projects", json={"title": title, "label_config": label_config})
        answer.raise_for_status()
        return answer.json()["id"]

    def upload(self, project: int, files: list[Path]) -> dict[int, Path]:
        """Each file a task (``data.image`` = ``/data/upload/...``): the tasks' ids, with their files."""
        # One form field per file: Label Studio keeps one file per field name.
        parts = [(f"file{i}", (f.name, f.read_bytes(), "image/jpeg")) for i, f in enumerate(files)]
        answer = self.api.post(f"/api/projects/{project}/import", files=parts, timeout=120)
        answer.raise_for_status()
        by_name = {f.name: f for f in files}
        tasks = {}
        for task in self.tasks(project):
            stored = task["data"]["image"].rsplit("/", 1)[-1]
            # Label Studio prefixes each upload's name with 8 characters and a dash.
            tasks[task["id"]] = by_name[stored.split("-", 1)[1]]
        assert len(tasks) == len(files)
        return tasks

    def tasks(self, project: int) -> list[dict[str, Any]]:
        answer = self.api.get("/api/tasks", params={"project": project, "page_size": 10_000, "fields": "all"})
        answer.raise_for_status()
        body = answer.json()
        return body["tasks"] if isinstance(body, dict) else body

    def connect(self, project: int, url: str, extra_params: dict[str, Any]) -> dict[str, Any]:
        """The ML backend at ``url``, as the project settings' "Connect model" does."""
        answer = self.api.post(
            "/api/ml", json={"url": url, "project": project, "title": "ssd", "extra_params": extra_params}
        )
        answer.raise_for_status()
        return answer.json()

    def webhook_header(self, project: int, url: str, headers: dict[str, str]) -> None:
        """Label Studio made a webhook to ``{backend}/webhook`` with the backend: give it headers."""
        hooks = [
            h for h in self.api.get("/api/webhooks", params={"project": project}).json() if h["url"] == url
        ]
        assert hooks, f"Label Studio made no webhook to {url}"
        self.api.patch(f"/api/webhooks/{hooks[0]['id']}", json={"headers": headers}).raise_for_status()

    def retrieve_predictions(self, project: int) -> dict[str, Any]:
        """The data manager's "Retrieve predictions" on every task."""
        answer = self.api.post(
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
            timeout=200,
        )
        answer.raise_for_status()
        return answer.json()

    def predictions(self, project: int) -> list[dict[str, Any]]:
        answer = self.api.get("/api/predictions", params={"project": project})
        answer.raise_for_status()
        return answer.json()

    def annotate(self, task: int, result: list[dict[str, Any]]) -> None:
        self.api.post(f"/api/tasks/{task}/annotations", json={"result": result}).raise_for_status()


@contextmanager
def label_studio(folder: Path, timeout_s: float = 240.0) -> Iterator[Studio]:
    """Label Studio on a free loopback port, its data in ``folder``; stopped at the end."""
    if not SERVER.exists():
        pytest.skip(f"Label Studio's environment is not built: make labelstudio-env ({SERVER} missing)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSD_", "LABEL_STUDIO", "DJANGO"))}
    env |= {
        # The ML backend and the webhook Label Studio makes for it are on this machine: Label
        # Studio refuses loopback and private addresses for both unless told not to.
        "ML_BLOCK_LOCAL_IP": "false",
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "COLLECT_ANALYTICS": "false",
    }
    log = folder / "label-studio.log"
    command = [
        str(SERVER), "start", "--no-browser", "--data-dir", str(folder / "data"),
        "--internal-host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING",
        "--username", "tester@example.com", "--password", "not-a-real-password",
        "--user-token", TOKEN, "--enable-legacy-api-token",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if api.get("/api/projects").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None:
                pytest.fail(f"Label Studio exited with {process.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"Label Studio not up within {timeout_s:g} s: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Studio(url, api, log)
    finally:
        api.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
