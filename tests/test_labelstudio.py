"""Label Studio's ML backend (service/labelstudio/): the labelling config, the fetch allow-list
and tokens, and the routes through the app, with a Label Studio stand-in serving task images
in-process (tests/test_labelstudio_live.py runs the real one)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_service import assert_error, encode, metric, run, scene, settings

from service.app import create_app
from service.labelstudio.client import FetchError, LabelStudio
from service.labelstudio.config import ConfigError, match, parse
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
PHOTOS = sorted((ROOT / "photos" / "val2017").glob("*.jpg"))
CLASSES = ["circle", "square", "triangle", "star", "hexagon", "cross"]
STUDIO = "http://studio.test:8080"
LEGACY = "0123456789abcdef0123456789abcdef01234567"


def config(labels: list[str] = CLASSES, name: str = "label", image: str = "image", key: str = "image") -> str:
    inner = "".join(f'<Label value="{label}" background="red"/>' for label in labels)
    return (
        f'<View><Image name="{image}" value="${key}"/>'
        f'<RectangleLabels name="{name}" toName="{image}">{inner}</RectangleLabels></View>'
    )


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


# --- the labelling config ---------------------------------------------------------------------


def test_the_config_names_the_boxes_tag_its_image_and_labels():
    target = parse(config(["circle", "Square"]))
    assert (target.from_name, target.to_name, target.data_key) == ("label", "image", "image")
    assert target.labels == ("circle", "Square")
    # Tag names without regard to case, the tag chosen by name among several.
    two = (
        '<view><image name="img" value="$photo"/><rectanglelabels name="a" toName="img">'
        '<label value="x"/></rectanglelabels><RectangleLabels name="b" toName="img">'
        '<Label value="y"/></RectangleLabels></view>'
    )
    assert parse(two).from_name == "a" and parse(two).data_key == "photo"
    assert parse(two, "b").labels == ("y",)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("<View>", "not valid XML"),
        (
            '<View><Image name="image" value="$image"/><Choices name="c" toName="image"/></View>',
            "RectangleLabels",
        ),
        (config().replace('name="image"', 'name="picture"'), "not an Image tag"),
        (config().replace('value="$image"', 'value="image"'), "task data key"),
        (config([]), "no Label values"),
        ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "not valid XML"),
        ('<?xml version="1.0"?><!DOCTYPE v SYSTEM "file:///etc/passwd"><View/>', "not valid XML"),
    ],
)
def test_a_config_predictions_cannot_be_made_for_says_why(text, words):
    with pytest.raises(ConfigError, match=words):
        parse(text)


def test_classes_match_labels_by_name_then_case_then_the_operators_renames():
    assert match(CLASSES[:3], ["circle", "SQUARE", "Tri"], {"triangle": "Tri"}).labels == (
        "circle",
        "SQUARE",
        "Tri",
    )
    # Two labels equal but for case: no guess.
    assert match(["square"], ["Square", "SQUARE"], {}).labels == (None,)
    labels = match(CLASSES, ["circle"], {})
    assert labels.unlabelled == [1, 2, 3, 4, 5]
    assert "5 of 6 classes have no label" in labels.describe(CLASSES)
    with pytest.raises(ConfigError, match="not labels of the project"):
        match(CLASSES, ["circle"], {"square": "Box"})


def test_label_renames_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SSD_LABELSTUDIO_LABELS", "circle=Round, square = Box")
    assert Settings().labelstudio_labels == {"circle": "Round", "square": "Box"}
    monkeypatch.setenv("SSD_LABELSTUDIO_LABELS", '{"a=b": "c,d"}')
    assert Settings().labelstudio_labels == {"a=b": "c,d"}
    monkeypatch.setenv("SSD_LABELSTUDIO_LABELS", "circle")
    with pytest.raises(ValueError, match="CLASS=LABEL"):
        Settings()
    monkeypatch.delenv("SSD_LABELSTUDIO_LABELS")
    monkeypatch.setenv("SSD_LABELSTUDIO_URL", "file:///etc")
    with pytest.raises(ValueError, match="http"):
        Settings()


# --- where images may come from -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, url",
    [
        ("/data/upload/1/a.jpg", f"{STUDIO}/data/upload/1/a.jpg"),
        ("/data/local-files/?d=images/a.jpg", f"{STUDIO}/data/local-files/?d=images/a.jpg"),
        (f"{STUDIO}/data/upload/1/a.jpg", f"{STUDIO}/data/upload/1/a.jpg"),
        ("http://STUDIO.test:8080/x.png", "http://STUDIO.test:8080/x.png"),
        ("data/upload/1/a.jpg", f"{STUDIO}/data/upload/1/a.jpg"),
    ],
)
def test_task_urls_on_the_configured_label_studio_are_fetched(value, url):
    assert LabelStudio(STUDIO, None).resolve(value) == url


@pytest.mark.parametrize(
    "value",
    [
        "http://evil.test/a.jpg",
        "//evil.test/a.jpg",
        "http://studio.test:8080@evil.test/a.jpg",
        "http://studio.test:8081/a.jpg",
        "https://studio.test:8080/a.jpg",
        "file:///etc/passwd",
        "data:image/png;base64,AAAA",
        "s3://bucket/a.jpg",
        "gopher://studio.test:8080/",
        "",
        42,
        None,
    ],
)
def test_any_other_url_is_refused_before_a_connection(value):
    with pytest.raises(FetchError):
        LabelStudio(STUDIO, None).resolve(value)


# --- a Label Studio stand-in ------------------------------------------------------------------


@dataclass
class Studio:
    """Task images by name under /data/upload/, the token exchange, and what was asked of it."""

    files: dict[str, bytes] = field(default_factory=dict)
    pat: str | None = None
    access: list[str] = field(default_factory=list)
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # host, path, authorization
    refreshes: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    delay_s: float = 0.0
    revoke_first: bool = False  # answer the first access token's use 401 (revoked early)
    on_fetch: Callable[[str], None] | None = None  # called with each image's name as it is asked for

    def app(self) -> Starlette:
        async def upload(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            self.seen.append((request.url.hostname or "", request.url.path, auth))
            name = request.path_params["name"]
            if self.on_fetch is not None:
                self.on_fetch(name)
            if name == "redirect":
                return Response(status_code=302, headers={"Location": "http://evil.test/x.jpg"})
            if not self._authorized(auth):
                return JSONResponse({"detail": "no"}, status_code=401)
            if name not in self.files:
                return JSONResponse({"detail": "missing"}, status_code=404)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay_s or 0.01)
            finally:
                self.in_flight -= 1
            return Response(self.files[name], media_type="image/jpeg")

        async def refresh(request: Request) -> Response:
            self.refreshes += 1
            if (await request.json()).get("refresh") != self.pat:
                return JSONResponse({"detail": "Token is invalid"}, status_code=401)
            token = jwt({"token_type": "access", "exp": int(time.time()) + 300, "n": self.refreshes})
            self.access.append(token)
            return JSONResponse({"access": token})

        return Starlette(
            routes=[
                Route("/data/upload/{name}", upload),
                Route("/api/token/refresh/", refresh, methods=["POST"]),
            ]
        )

    def _authorized(self, auth: str) -> bool:
        if self.pat is None:
            return auth == f"Token {LEGACY}"
        if self.revoke_first and self.access and auth == f"Bearer {self.access[0]}":
            return False
        return auth.startswith("Bearer ") and auth[7:] in self.access


@asynccontextmanager
async def backend(
    studio: Studio, token: str | None = LEGACY, **overrides
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The service with the demo model, its Label Studio routes fetching from ``studio``."""
    overrides.setdefault("labelstudio_url", STUDIO)
    app = create_app(settings(DEMO, labelstudio_token=token, **overrides))
    async with app.router.lifespan_context(app):
        if app.state.labelstudio.studio is not None:
            await app.state.labelstudio.studio.aclose()
            app.state.labelstudio.studio = LabelStudio(
                STUDIO, app.state.service.settings.labelstudio_token, httpx.ASGITransport(app=studio.app())
            )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://detector", timeout=60) as client:
            yield client, app.state.service


def tasks(*names: str, key: str = "image") -> list[dict]:
    return [
        {"id": i + 1, "data": {key: f"/data/upload/{name}"}, "project": 1} for i, name in enumerate(names)
    ]


def predict_body(
    task_list: list[dict], label_config: str | None = None, project: str = "1.1700000000"
) -> dict:
    return {"tasks": task_list, "project": project, "label_config": label_config or config(), "params": {}}


def back_to_pixels(region: dict) -> list[float]:
    v, w, h = region["value"], region["original_width"], region["original_height"]
    return [
        v["x"] * w / 100,
        v["y"] * h / 100,
        (v["x"] + v["width"]) * w / 100,
        (v["y"] + v["height"]) * h / 100,
    ]


def images() -> dict[str, bytes]:
    files = {f"scene{i}.jpg": encode(scene(640, 480, seed=i)) for i in range(3)}
    files |= {p.name: p.read_bytes() for p in PHOTOS[:2]}
    return files


# --- the routes ---------------------------------------------------------------------------------


def test_predictions_are_the_detect_routes_answers_in_label_studios_form():
    studio = Studio(files=images())

    async def go():
        async with backend(studio) as (client, _):
            setup = await client.post(
                "/labelstudio/setup",
                json={
                    "project": "1.1700000000",
                    "schema": config(),
                    "extra_params": {"score_threshold": 0.3},
                },
            )
            assert setup.status_code == 200, setup.text
            version = setup.json()["model_version"]
            model = (await client.get("/model")).json()
            assert version == f"{model['name']}-v{model['version']}-{model['sha256'][:12]}"
            names = list(studio.files)
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks(*names)))
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert len(results) == len(names)
            boxes = 0
            for name, item in zip(names, results, strict=True):
                detect = await client.post(
                    "/detect", params={"score_threshold": 0.3}, content=studio.files[name]
                )
                expected = detect.json()["results"][0]
                assert item["model_version"] == version
                regions = item["result"]
                assert len(regions) == len(expected["detections"])
                for region, want in zip(regions, expected["detections"], strict=True):
                    assert region["type"] == "rectanglelabels"
                    assert (region["from_name"], region["to_name"]) == ("label", "image")
                    assert (region["original_width"], region["original_height"]) == (
                        expected["width"],
                        expected["height"],
                    )
                    assert region["value"]["rectanglelabels"] == [want["label"]]
                    assert region["value"]["rotation"] == 0
                    assert region["score"] == pytest.approx(want["score"], abs=1e-5)
                    assert back_to_pixels(region) == pytest.approx(want["box"], abs=0.01)
                assert item["score"] == pytest.approx(max((r["score"] for r in regions), default=0.0))
                boxes += len(regions)
            assert boxes >= 10  # the scenes have shapes
            versions = (await client.get("/labelstudio/versions")).json()
            assert versions == {"versions": [version]}

    run(go())


def test_tasks_beyond_the_image_limit_go_in_chunks_each_admitted_and_answered_in_order():
    studio = Studio(files=images(), delay_s=0.05)

    async def go():
        async with backend(studio, max_images_per_request=2) as (client, state):
            names = [*studio.files, *studio.files]  # 10 tasks
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks(*names)))
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert len(results) == 10 and all("result" in r for r in results)
            # The same image, the same answer, wherever its chunk.
            assert results[0]["result"] == results[5]["result"]
            assert studio.most_in_flight <= 2
            text = state.metrics.exposition().decode()
            assert metric(text, 'detector_images_total{model="ssdlite320_mobilenet_v3_large"}') == 10
            assert metric(text, 'detector_requests_total{route="/labelstudio/predict",code="200"}') == 1
            assert metric(text, 'detector_labelstudio_tasks_total{result="predicted"}') == 10

    run(go())


def test_a_task_whose_image_fails_gets_its_error_and_the_others_their_predictions():
    files = images()
    files["corrupt.jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    files["huge.jpg"] = encode(Image.new("RGB", (64, 64))) + b"\0" * 300_000
    files["vector.svg"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
    studio = Studio(files=files)
    good = next(iter(images()))
    task_list = tasks(good, "corrupt.jpg", "missing.jpg", "redirect", "huge.jpg", good)
    task_list.append({"id": 7, "data": {"image": "http://evil.test/a.jpg"}})
    task_list.append({"id": 8, "data": {"picture": "/data/upload/x.jpg"}})
    task_list.append({"id": 9, "data": {"image": "/data/upload/vector.svg"}})

    async def go():
        async with backend(studio, max_image_bytes=200_000, max_images_per_request=3) as (client, state):
            answer = await client.post("/labelstudio/predict", json=predict_body(task_list))
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert len(results) == 9
            assert "result" in results[0] and results[0]["result"] == results[5]["result"]
            errors = {i + 1: r["error"] for i, r in enumerate(results) if "error" in r}
            assert all("result" not in results[i - 1] for i in errors)
            assert set(errors) == {2, 3, 4, 5, 7, 8, 9}
            assert errors[2].startswith("task 2: ")
            assert "404" in errors[3]
            assert "redirect" in errors[4] and "not followed" in errors[4]
            assert "SSD_MAX_IMAGE_BYTES" in errors[5]
            assert "not on the configured Label Studio" in errors[7]
            assert "'image'" in errors[8]
            assert errors[9].startswith("task 9: ")  # a format outside the allow-list
            assert not [s for s in studio.seen if s[0] != "studio.test"]
            text = state.metrics.exposition().decode()
            assert metric(text, 'detector_labelstudio_tasks_total{result="error"}') == 7

    run(go())


def test_a_personal_access_token_is_exchanged_and_renewed_once_when_refused():
    pat = jwt({"token_type": "refresh", "exp": int(time.time()) + 86400})
    studio = Studio(files=images(), pat=pat, revoke_first=True)
    name = next(iter(studio.files))

    async def go():
        async with backend(studio, token=pat) as (client, _):
            for _ in range(2):
                answer = await client.post("/labelstudio/predict", json=predict_body(tasks(name)))
                assert "result" in answer.json()["results"][0], answer.text
        # The first access token refused (revoked): exchanged once more, then kept.
        assert studio.refreshes == 2
        auths = [auth for _, path, auth in studio.seen]
        assert auths == [
            f"Bearer {studio.access[0]}",
            f"Bearer {studio.access[1]}",
            f"Bearer {studio.access[1]}",
        ]

    run(go())


def test_a_refused_token_is_each_tasks_error_naming_the_setting():
    studio = Studio(files=images(), pat=jwt({"token_type": "refresh", "exp": 1}))
    name = next(iter(studio.files))

    async def go():
        for token in (jwt({"token_type": "refresh", "exp": 2}), "wrong-legacy-token"):
            async with backend(studio, token=token) as (client, _):
                answer = await client.post("/labelstudio/predict", json=predict_body(tasks(name)))
                assert answer.status_code == 200
                assert "SSD_LABELSTUDIO_TOKEN" in answer.json()["results"][0]["error"]

    run(go())


def test_without_a_label_studio_configured_tasks_say_so():
    async def go():
        async with backend(Studio(), labelstudio_url=None) as (client, _):
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks("a.jpg")))
            assert "SSD_LABELSTUDIO_URL" in answer.json()["results"][0]["error"]

    run(go())


@pytest.mark.timing
def test_an_image_fetched_past_the_deadline_is_that_tasks_error():
    studio = Studio(files=images(), delay_s=3.0)

    async def go():
        async with backend(studio, request_timeout_s=1.0) as (client, _):
            started = time.monotonic()
            answer = await client.post(
                "/labelstudio/predict", json=predict_body(tasks(next(iter(studio.files))))
            )
            assert time.monotonic() - started < 2.5
            assert "deadline" in answer.json()["results"][0]["error"]

    run(go())


def test_setup_keeps_each_projects_settings_and_refuses_what_it_cannot_use():
    studio = Studio(files=images())
    name = next(iter(studio.files))

    async def go():
        async with backend(studio, labelstudio_labels={"circle": "Round"}) as (client, state):

            async def setup(
                extra: dict | None, schema: str = config(), project: str = "2.1"
            ) -> httpx.Response:
                return await client.post(
                    "/labelstudio/setup", json={"project": project, "schema": schema, "extra_params": extra}
                )

            assert "threshold" in assert_error(await setup({"threshold": 0.3}), 422)["message"]
            assert "tile" in assert_error(await setup({"tile": "huge"}), 422)["message"]
            assert "RectangleLabels" in assert_error(await setup(None, "<View/>"), 422)["message"]
            assert (
                "SSD_LABELSTUDIO_LABELS" in assert_error(await setup(None, config(["cat"])), 422)["message"]
            )
            assert_error(await setup({"model": "nope"}), 404, "model_not_found")
            # A project of its own threshold, its label renamed by the operator.
            labels = ["Round", "square", "triangle", "star", "hexagon", "cross"]
            ok = await setup({"score_threshold": 0.9, "max_detections": 2}, config(labels), project="3.1")
            assert ok.status_code == 200 and ok.json()["labels"] == "every class has a label"
            body = predict_body(tasks(name), config(labels), project="3.1")
            strict = (await client.post("/labelstudio/predict", json=body)).json()["results"][0]
            loose = (await client.post("/labelstudio/predict", json={**body, "project": "4.1"})).json()
            regions = strict["result"]
            assert 1 <= len(regions) <= 2 and all(r["score"] >= 0.9 for r in regions)
            assert len(loose["results"][0]["result"]) > len(regions)
            found = {r["value"]["rectanglelabels"][0] for r in loose["results"][0]["result"]}
            assert "circle" not in found
            # Classes without a label are left out and counted.
            partial = predict_body(tasks(name), config(["square"]), project="5.1")
            kept = (await client.post("/labelstudio/predict", json=partial)).json()["results"][0]["result"]
            assert {r["value"]["rectanglelabels"][0] for r in kept} <= {"square"}
            text = state.metrics.exposition().decode()
            assert metric(text, "detector_labelstudio_unlabelled_detections_total") > 0

    run(go())


@pytest.mark.parametrize(
    "body, words",
    [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": [{"id": "1", "data": {}}]}, "integer id"),
        ({"tasks": [{"id": 1}]}, "data object"),
        ({"tasks": [{"id": 1, "data": {"image": "/x"}}], "label_config": "<View/>"}, "RectangleLabels"),
        ({"tasks": [{"id": 1, "data": {"image": "/x"}}]}, "empty"),
    ],
)
def test_a_predict_request_that_is_not_label_studios_is_refused_naming_the_problem(body, words):
    async def go():
        async with backend(Studio()) as (client, _):
            assert words in assert_error(await client.post("/labelstudio/predict", json=body), 422)["message"]
            assert_error(await client.post("/labelstudio/predict", content=b"[1, 2]"), 400)
            assert_error(await client.post("/labelstudio/predict", content=b"{not json"), 400)

    run(go())


def test_health_and_the_webhook():
    async def go():
        async with backend(Studio()) as (client, state):
            assert (await client.get("/labelstudio/health")).json()["status"] == "UP"
            assert_error(
                await client.post("/labelstudio/webhook", json={"action": "ANNOTATION_CREATED"}), 403
            )
        async with backend(Studio(), admin_token="operator") as (client, state):
            hook = "/labelstudio/webhook"
            assert_error(
                await client.post(hook, json={"action": "X"}, headers={"Authorization": "Bearer no"}), 403
            )
            auth = {"Authorization": "Bearer operator"}
            for action in ("ANNOTATION_CREATED", "ANNOTATION_CREATED", "PROJECT_UPDATED", "rm -rf /"):
                answer = await client.post(
                    hook, json={"action": action, "annotation": {"id": 1}}, headers=auth
                )
                assert answer.status_code == 200
            text = state.metrics.exposition().decode()
            events = "detector_labelstudio_webhook_events_total"
            assert metric(text, events + '{action="ANNOTATION_CREATED"}') == 2
            assert metric(text, events + '{action="other"}') == 1
            state.draining = True
            health = await client.get("/labelstudio/health")
            assert health.status_code == 503 and "draining" in health.json()["error"]

    run(go())


def test_what_a_photo_is_answered_in_is_its_size_after_exif_orientation():
    # Stored sideways with EXIF orientation 6 (rotate 90 clockwise): shown 480 wide, 640 tall.
    image = scene(640, 480, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    studio = Studio(files={"turned.jpg": out.getvalue()})

    async def go():
        async with backend(studio) as (client, _):
            body = predict_body(tasks("turned.jpg"))
            regions = (await client.post("/labelstudio/predict", json=body)).json()["results"][0]["result"]
            assert regions and {(r["original_width"], r["original_height"]) for r in regions} == {(480, 640)}

    run(go())


def test_the_core_refusing_the_first_chunk_is_the_answer_and_a_later_chunk_its_tasks_error():
    files = images()
    names = list(files)[:4]

    async def go():
        # The first chunk: refused at the door, before any image is fetched.
        async with backend(Studio(files=files)) as (client, state):
            state.repository.get(None).batcher.times.reset({1: 60.0, 2: 60.0})
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks(*names)))
            assert_error(answer, 503, "overloaded")
            text = state.metrics.exposition().decode()
            assert metric(text, 'detector_rejected_requests_total{reason="overloaded"}') == 1
            route = 'detector_requests_total{route="/labelstudio/predict",code="503"}'
            assert metric(text, route) == 1
        # A later chunk: admitted at the door, refused once its images are in (the model has
        # become slow meanwhile); the first chunk's predictions stay, the rest say why.
        studio = Studio(files=files)
        async with backend(studio, max_images_per_request=2) as (client, state):
            batcher = state.repository.get(None).batcher

            def slow_from_the_third(name: str) -> None:
                if name == names[2]:
                    batcher.times.reset({1: 60.0, 2: 60.0})

            studio.on_fetch = slow_from_the_third
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks(*names)))
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            assert "result" in results[0] and "result" in results[1]
            assert all("not predicted" in r["error"] and "result" not in r for r in results[2:])
            text = state.metrics.exposition().decode()
            assert metric(text, 'detector_rejected_requests_total{reason="overloaded"}') == 1

    run(go())


def test_an_image_larger_than_the_request_budget_is_its_tasks_error():
    files = images()
    files["big.png"] = encode(Image.effect_noise((900, 900), 64).convert("RGB"), "PNG")
    assert len(files["big.png"]) > 1024 * 1024

    async def go():
        async with backend(Studio(files=files), request_budget_mb=1, max_request_bytes=1024 * 1024) as (
            client,
            _,
        ):
            good = next(iter(images()))
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks("big.png", good)))
            results = answer.json()["results"]
            assert "SSD_REQUEST_BUDGET_MB" in results[0]["error"] and "result" in results[1]

    run(go())


def test_projects_kept_are_bounded_by_count_and_by_characters():
    from service.labelstudio.projects import Projects, ProjectSettings

    kept = Projects(limit=3, chars=100)
    for i in range(5):
        kept.set(f"{i}.1", ProjectSettings(), "x" * 10)
    assert [kept.get(f"{i}.1")[1] for i in range(5)] == [None, None, "x" * 10, "x" * 10, "x" * 10]
    kept.set("big.1", ProjectSettings(labels={"a": "b" * 60}), "y" * 30)  # the oldest go to fit it
    assert kept.get("big.1")[1] == "y" * 30 and kept.get("2.1")[1] is None and kept._kept <= 100
    kept.set("big.1", ProjectSettings(), "z")  # set again: weighed once
    assert kept._kept == sum(len(p) + len(s or "") for p, (_, s) in kept._known.items())


@pytest.mark.timing
def test_a_predict_answers_what_it_did_before_label_studio_would_give_up():
    """Label Studio stores nothing of a predict it stopped waiting for: past SSD_LABELSTUDIO_PREDICT_S
    no chunk starts, and the tasks left say so (the next predict asks for them again)."""
    studio = Studio(files=images(), delay_s=0.3)
    names = list(studio.files)

    async def go():
        async with backend(studio, max_images_per_request=1, labelstudio_predict_s=0.5) as (client, _):
            answer = await client.post("/labelstudio/predict", json=predict_body(tasks(*names)))
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            done = [r for r in results if "result" in r]
            assert 1 <= len(done) <= 3 and "result" in results[0]
            left = results[len(done) :]
            assert left and all("SSD_LABELSTUDIO_PREDICT_S" in r["error"] for r in left)

    run(go())


@pytest.mark.timing
def test_a_client_that_goes_away_stops_the_predict_and_its_later_chunks():
    """Label Studio gives up (its 100 s) while a chunk runs: the work stops, no later chunk is
    fetched, and the request counts as 499 (client_disconnected), not as a server error."""
    from helpers import slow_down

    studio = Studio(files=images())
    names = list(studio.files)[:4]
    body = json.dumps(predict_body(tasks(*names))).encode()

    async def go():
        async with backend(studio, max_images_per_request=2) as (client, state):
            slow_down(state.repository.get(None), 2.0)
            app = client._transport.app
            sent: list[dict] = []
            first = True

            async def receive() -> dict:
                nonlocal first
                if first:
                    first = False
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(0.2)
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": "/labelstudio/predict", "raw_path": b"/labelstudio/predict",
                "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000),
                "server": ("detector", 80),
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())],
            }  # fmt: skip
            started = time.monotonic()
            await app(scope, receive, send)
            assert time.monotonic() - started < 1.8  # not the slowed batch's 2 s, let alone both chunks'
            assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
            assert len(studio.seen) == 2  # the first chunk's images only
            text = state.metrics.exposition().decode()
            assert metric(text, 'detector_rejected_requests_total{reason="disconnected"}') == 1

    run(go())
