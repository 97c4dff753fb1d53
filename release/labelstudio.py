"""The labelling loop's two calls to Label Studio, as commands:

- ``ssd labelstudio connect``: a project whose labelling config has the served model's classes as
  ``RectangleLabels`` (each with ``category`` = its class index, so that Label Studio's COCO
  export numbers them in the model's order, not alphabetically), with the detector connected as
  its ML backend, and the webhook Label Studio makes for that backend given the operator's token.
  Run again, it finds the project by title and the backend by URL instead of adding others.
- ``ssd labelstudio export``: the project in Label Studio's "COCO with images" form, unpacked into
  a folder (``result.json`` beside ``images/``), ready for ``ssd train --data``.

Both take Label Studio's URL and token from ``--url``/``--token`` or the service's own settings
(``SSD_LABELSTUDIO_URL``, ``SSD_LABELSTUDIO_TOKEN``).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import httpx

from service.labelstudio.client import REFRESH_PATH, is_refresh_token

BACKEND_PATH = "/labelstudio"


class LabelStudioError(RuntimeError):
    """Label Studio or the detector refused or failed; the message says which and why."""


def client(url: str, token: str, timeout_s: float = 120.0) -> httpx.Client:
    """An API client of Label Studio with ``token`` (a personal access token is exchanged for an
    access token first; a legacy one is sent as it is)."""
    base = url.rstrip("/")
    if not is_refresh_token(token):
        return httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=timeout_s)
    answer = _checked(
        httpx.post(base + REFRESH_PATH, json={"refresh": token}, timeout=30), "the token refresh"
    )
    return httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {answer.json()['access']}"}, timeout=timeout_s
    )


def _checked(answer: httpx.Response, what: str) -> httpx.Response:
    if answer.status_code >= 400:
        raise LabelStudioError(f"{what}: {answer.status_code} {answer.text[:500]}")
    return answer


def label_config(classes: list[str]) -> str:
    """An image project boxing each of ``classes``, in their order."""
    labels = "".join(
        f"<Label value={quoteattr(name)} category={quoteattr(str(i))}/>" for i, name in enumerate(classes)
    )
    return (
        '<View><Image name="image" value="$image" zoom="true"/>'
        f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>'
    )


def served_classes(detector: str) -> tuple[str, list[str]]:
    """The detector's default model: its served name and classes."""
    try:
        answer = httpx.get(detector.rstrip("/") + "/model", timeout=30)
    except httpx.HTTPError as exc:
        raise LabelStudioError(f"the detector at {detector} is unreachable: {exc!r}") from None
    model = _checked(answer, f"the detector's /model at {detector}").json()
    return model["name"], list(model["metadata"]["classes"])


def connect(
    api: httpx.Client, detector: str, title: str, admin_token: str | None, extra: dict[str, Any]
) -> dict[str, Any]:
    """The project for the detector's model, its ML backend and webhook: what was found or made."""
    name, classes = served_classes(detector)
    projects = _checked(
        api.get("/api/projects", params={"title": title, "page_size": 1000}), "listing projects"
    )
    found = [p for p in _results(projects.json()) if p.get("title") == title]
    if found:
        project, made = found[0]["id"], False
    else:
        answer = api.post("/api/projects", json={"title": title, "label_config": label_config(classes)})
        project, made = _checked(answer, "creating the project").json()["id"], True
    backend = detector.rstrip("/") + BACKEND_PATH
    backends = _checked(api.get("/api/ml", params={"project": project}), "listing ML backends").json()
    if not [b for b in _results(backends) if b.get("url", "").rstrip("/") == backend]:
        answer = api.post(
            "/api/ml", json={"url": backend, "project": project, "title": name, "extra_params": extra}
        )
        _checked(answer, f"connecting {backend} (Label Studio calls its health and setup)")
    hooked = False
    if admin_token:
        hooks = _checked(api.get("/api/webhooks", params={"project": project}), "listing webhooks").json()
        for hook in _results(hooks):
            if hook.get("url") == backend + "/webhook":
                patch = {"headers": {"Authorization": f"Bearer {admin_token}"}}
                _checked(api.patch(f"/api/webhooks/{hook['id']}", json=patch), "giving the webhook its token")
                hooked = True
    return {"project": project, "created": made, "backend": backend, "classes": classes, "webhook": hooked}


def _results(body: Any) -> list[dict[str, Any]]:
    """A list answer, or a paginated one's results (Label Studio answers both ways)."""
    if isinstance(body, dict):
        return list(body.get("results", []))
    return list(body)


def export(api: httpx.Client, project: int, out: Path) -> Path:
    """The project as "COCO with images" in ``out`` (replaced whole, never half-written):
    ``out/result.json``."""
    answer = api.get(
        f"/api/projects/{project}/export", params={"exportType": "COCO_WITH_IMAGES"}, timeout=600
    )
    _checked(answer, f"exporting project {project}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
            for member in archive.namelist():  # a member outside the folder is no export of ours
                target = (staging / member).resolve()
                if not target.is_relative_to(staging.resolve()):
                    raise LabelStudioError(f"the export holds {member!r}, outside its folder")
            archive.extractall(staging)
        if not (staging / "result.json").is_file():
            raise LabelStudioError("the export has no result.json")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "result.json"


def _access(command: argparse.ArgumentParser) -> None:
    command.add_argument("--url", default=os.environ.get("SSD_LABELSTUDIO_URL"), help="Label Studio")
    command.add_argument("--token", default=os.environ.get("SSD_LABELSTUDIO_TOKEN"), help="its token")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="labelstudio_command", required=True, metavar="COMMAND")
    connect = sub.add_parser(
        "connect", help="a project of the served model's classes, the detector as its ML backend"
    )
    _access(connect)
    connect.add_argument(
        "--detector", default="http://127.0.0.1:8000", help="the detector, as Label Studio reaches it"
    )
    connect.add_argument("--title", default="SSD detector", help="the project's title (found or made)")
    connect.add_argument(
        "--admin-token", default=os.environ.get("SSD_ADMIN_TOKEN"), help="for the webhook (SSD_ADMIN_TOKEN)"
    )
    connect.add_argument("--score-threshold", type=float, default=None, help="the project's threshold")
    export = sub.add_parser("export", help="a project's boxes as COCO with images, for ssd train --data")
    _access(export)
    export.add_argument("--project", type=int, required=True, help="the project's id")
    export.add_argument("--out", required=True, help="folder to write (replaced)")


def run(args: argparse.Namespace) -> int:
    import json

    if not args.url or not args.token:
        print(
            "ssd labelstudio: --url and --token (or SSD_LABELSTUDIO_URL, SSD_LABELSTUDIO_TOKEN) are needed",
            file=sys.stderr,
        )
        return 2
    try:
        with client(args.url, args.token) as api:
            if args.labelstudio_command == "connect":
                extra = {} if args.score_threshold is None else {"score_threshold": args.score_threshold}
                print(json.dumps(connect(api, args.detector, args.title, args.admin_token, extra)))
            else:
                print(export(api, args.project, Path(args.out)))
    except (LabelStudioError, httpx.HTTPError, zipfile.BadZipFile) as exc:
        print(f"ssd labelstudio: {exc}", file=sys.stderr)
        return 1
    return 0
