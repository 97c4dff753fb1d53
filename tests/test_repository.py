"""The model repository: its layouts, names and versions, the default model, per-model metrics,
and files added, replaced, broken and removed while it serves."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_service import encode, metric, run, scene, serving

from service.repository import scan
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo.onnx"
JPEG = {"Content-Type": "image/jpeg"}


def repo_settings(folder: Path, **overrides) -> Settings:
    return Settings(model_dir=str(folder), providers=["cpu"], intra_op_threads=2, **overrides)


def test_scan_reads_tritons_layout_and_flat_files(tmp_path):
    (tmp_path / "alpha" / "1").mkdir(parents=True)
    (tmp_path / "alpha" / "1" / "model.onnx").write_bytes(b"x")
    (tmp_path / "alpha" / "3").mkdir()
    (tmp_path / "alpha" / "3" / "model.onnx").write_bytes(b"x")
    (tmp_path / "alpha" / "0").mkdir()  # versions are positive
    (tmp_path / "alpha" / "0" / "model.onnx").write_bytes(b"x")
    (tmp_path / "alpha" / "2").mkdir()  # no model.onnx: not a version
    (tmp_path / "alpha" / "config.pbtxt").write_text("")
    (tmp_path / "alpha" / "v4").mkdir()
    (tmp_path / "beta.onnx").write_bytes(b"x")
    (tmp_path / ".gamma.onnx").write_bytes(b"x")  # a temporary file being written
    (tmp_path / "bad name.onnx").write_bytes(b"x")  # not a name a URL or a label takes as is
    (tmp_path / "notes.txt").write_text("")
    found = scan(tmp_path)
    assert sorted(found) == [("alpha", 1), ("alpha", 3), ("beta", 1)]
    assert found[("alpha", 3)] == tmp_path / "alpha" / "3" / "model.onnx"
    assert scan(tmp_path / "missing") == {}


def test_model_path_and_model_dir_together_is_an_error(tmp_path):
    with pytest.raises(ValidationError, match="not both"):
        Settings(model_path=str(DEMO), model_dir=str(tmp_path))
    assert Settings(model_dir=str(tmp_path)).model_dir == str(tmp_path)  # the path's default is no conflict


def test_every_model_served_by_name_and_version_with_its_own_metrics(tmp_path, served_artifact):
    shutil.copy(DEMO, tmp_path / "demo.onnx")
    for version in (1, 2):
        (tmp_path / "shapes" / str(version)).mkdir(parents=True)
        shutil.copy(served_artifact, tmp_path / "shapes" / str(version) / "model.onnx")
    image = encode(scene(seed=1))

    async def go():
        async with serving(repo_settings(tmp_path)) as client:
            assert (await client.get("/readyz")).status_code == 200
            index = (await client.post("/v2/repository/index")).json()
            assert [(m["name"], m["version"], m["state"]) for m in index] == [
                ("demo", "1", "READY"), ("shapes", "1", "READY"), ("shapes", "2", "READY")
            ]  # fmt: skip
            # The default is the first by name; ?model= picks another.
            assert (await client.get("/model")).json()["name"] == "demo"
            shapes = (await client.get("/model", params={"model": "shapes"})).json()
            assert (shapes["name"], shapes["version"]) == ("shapes", "2")
            both = [
                await client.post("/detect", content=image, headers=JPEG, params={"model": name})
                for name in ("demo", "shapes")
            ]
            assert [r.status_code for r in both] == [200, 200]
            demo_found, random_found = (r.json()["results"][0]["detections"] for r in both)
            assert demo_found != random_found  # two different models answered
            unknown = await client.post("/detect", content=image, headers=JPEG, params={"model": "nope"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
            assert "demo, shapes" in unknown.json()["error"]["message"]
            meta = (await client.get("/v2/models/shapes")).json()
            assert meta["versions"] == ["1", "2"]
            assert (await client.get("/v2/models/shapes/versions/1/ready")).status_code == 200
            text = (await client.get("/metrics")).text
            assert metric(text, 'detector_images_total{model="demo"}') == 1
            assert metric(text, 'detector_images_total{model="shapes"}') == 1
            assert text.count("detector_model_info{") == 2  # one per served name
            assert metric(text, "detector_ready") == 1

    run(go())


def test_default_model_setting_and_the_only_model(tmp_path):
    shutil.copy(DEMO, tmp_path / "a.onnx")
    shutil.copy(DEMO, tmp_path / "b.onnx")

    async def go():
        async with serving(repo_settings(tmp_path, default_model="b")) as client:
            assert (await client.get("/model")).json()["name"] == "b"

    run(go())


def test_a_single_model_path_is_named_by_its_metadata_or_the_setting(served_artifact):
    async def go():
        config = Settings(model_path=str(served_artifact), providers=["cpu"], intra_op_threads=2)
        async with serving(config) as client:
            index = (await client.post("/v2/repository/index")).json()
            assert index == [{"name": "ssdlite320_mobilenet_v3_large", "version": "1", "state": "READY"}]
        config = Settings(model_path=str(served_artifact), model_name="detector", providers=["cpu"])
        async with serving(config) as client:
            assert (await client.get("/v2/models/detector/ready")).status_code == 200
            assert (await client.get("/model", params={"model": "detector"})).status_code == 200

    run(go())


@pytest.mark.timing
def test_models_added_broken_replaced_and_removed_while_serving(tmp_path, served_artifact):
    shutil.copy(DEMO, tmp_path / "demo.onnx")
    image = encode(scene(seed=2))

    async def go():
        async with serving(repo_settings(tmp_path, model_poll_s=0.2)) as client:
            stop = asyncio.Event()
            codes: list[int] = []
            errors: list[str] = []

            async def load() -> None:  # requests to the first model all along
                while not stop.is_set():
                    response = await client.post(
                        "/detect", content=image, headers=JPEG, params={"model": "demo"}
                    )
                    codes.append(response.status_code)
                    if response.status_code != 200:
                        errors.append(response.text)

            async def until(check, seconds: float = 60.0) -> None:
                for _ in range(int(seconds / 0.1)):
                    if await check():
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError("the repository did not change in time")

            async def state_of(name: str) -> str | None:
                index = (await client.post("/v2/repository/index")).json()
                return next((m["state"] for m in index if m["name"] == name), None)

            traffic = asyncio.ensure_future(load())
            # Added: picked up, warmed, then listed and served.
            shutil.copy(served_artifact, tmp_path / "extra.onnx")
            await until(lambda: _is(state_of("extra"), "READY"))
            extra = await client.post("/detect", content=image, headers=JPEG, params={"model": "extra"})
            assert extra.status_code == 200
            # A broken file: listed as unavailable, refused at load; the others keep serving.
            (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
            await until(lambda: _is(state_of("broken"), "UNAVAILABLE"))
            assert (await client.get("/readyz")).status_code == 200  # a broken file is no model
            broken = await client.get("/v2/models/broken/ready")  # why, where the protocol allows
            assert broken.status_code == 503 and "INVALID_PROTOBUF" in broken.json()["error"], broken.text
            index = (await client.post("/v2/repository/index")).json()
            (entry,) = [m for m in index if m["name"] == "broken"]
            assert entry["state"] == "UNAVAILABLE" and "INVALID_PROTOBUF" in entry["reason"], entry
            assert all("reason" not in m for m in index if m["state"] == "READY")
            (tmp_path / "broken.onnx").unlink()
            await until(lambda: _is(state_of("broken"), None))
            # Replaced: the new artifact swapped in (by its sha256).
            before = (await client.get("/model", params={"model": "extra"})).json()["sha256"]
            staged = tmp_path / ".extra.onnx.tmp"
            shutil.copy(DEMO, staged)
            staged.replace(tmp_path / "extra.onnx")

            async def swapped() -> bool:
                return (await client.get("/model", params={"model": "extra"})).json()["sha256"] != before

            await until(swapped)
            # Removed: gone from the index and 404, its series gone from /metrics.
            (tmp_path / "extra.onnx").unlink()
            await until(lambda: _is(state_of("extra"), None))
            gone = await client.post("/detect", content=image, headers=JPEG, params={"model": "extra"})
            assert gone.status_code == 404
            assert 'model="extra"' not in (await client.get("/metrics")).text
            stop.set()
            await traffic
            assert codes and set(codes) == {200}, errors

    run(go())


async def _is(value, expected) -> bool:
    return (await value) == expected


@pytest.mark.timing
@pytest.mark.slow
def test_the_demo_model_and_an_ssd300_export_side_by_side_under_load(tmp_path):
    """Two different artifacts (SSDlite320 with the demo's 6 classes, a random SSD300 VGG16 with 3
    at 300x300) in one repository: both answer under load; a third added and a corrupt one
    dropped in while they serve cost no request."""
    from helpers import calibrated

    from export.exporter import export_artifact
    from export.sources import Source

    (tmp_path / "ssd300" / "1").mkdir(parents=True)
    export_artifact(Source(calibrated("ssd300_vgg16", 4), ["a", "b", "c"], "test"),
                    tmp_path / "ssd300" / "1" / "model.onnx")  # fmt: skip
    shutil.copy(DEMO, tmp_path / "demo.onnx")
    image = encode(scene(seed=3))

    async def go():
        config = repo_settings(tmp_path, model_poll_s=0.2, max_batch_size=2)
        async with serving(config) as client:
            meta = (await client.get("/v2/models/ssd300")).json()
            assert meta["parameters"]["classes"] == ["a", "b", "c"]
            assert meta["inputs"][1]["shape"] == [-1, 300, 300, 3]
            stop = asyncio.Event()
            codes: dict[str, list[int]] = {"demo": [], "ssd300": []}

            async def load(name: str) -> None:
                while not stop.is_set():
                    response = await client.post(
                        "/detect", content=image, headers=JPEG, params={"model": name}
                    )
                    codes[name].append(response.status_code)

            traffic = [asyncio.ensure_future(load(name)) for name in codes for _ in range(2)]
            shutil.copy(DEMO, tmp_path / "third.onnx")
            (tmp_path / "corrupt.onnx").write_bytes(DEMO.read_bytes()[:100_000])  # truncated
            for _ in range(600):
                index = {m["name"]: m["state"] for m in (await client.post("/v2/repository/index")).json()}
                if index.get("third") == "READY" and index.get("corrupt") == "UNAVAILABLE":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the repository did not pick up the new files: {index}")
            third = await client.post("/detect", content=image, headers=JPEG, params={"model": "third"})
            assert third.status_code == 200
            stop.set()
            await asyncio.gather(*traffic)
            for name, seen in codes.items():
                assert seen and set(seen) == {200}, (name, seen)
            assert (await client.get("/readyz")).status_code == 200

    run(go())


def test_a_broken_file_never_becomes_the_default_model(tmp_path, caplog):
    """Random bytes named ``aa_broken.onnx`` beside ``shapes.onnx``: first by name, but never
    loaded, so never the default; the service is ready and its default route serves shapes."""
    shutil.copy(DEMO, tmp_path / "shapes.onnx")
    (tmp_path / "aa_broken.onnx").write_bytes(bytes(range(256)) * 64)
    image = encode(scene(seed=3))

    async def go():
        with caplog.at_level("INFO"):
            async with serving(repo_settings(tmp_path)) as client:
                assert (await client.get("/readyz")).status_code == 200
                answer = await client.post("/detect", content=image, headers=JPEG)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"]["name"] == "shapes"
                model = (await client.get("/model")).json()
                assert (model["name"], model["default"]) == ("shapes", "shapes")
                broken = next(m for m in model["models"] if m["name"] == "aa_broken")
                assert broken["state"] == "UNAVAILABLE" and "not a loadable ONNX model" in broken["error"]
                refused = await client.post(
                    "/detect", content=image, headers=JPEG, params={"model": "aa_broken"}
                )
                assert refused.status_code == 503 and "not a loadable" in refused.json()["error"]["message"]
        # The start-up log names the served model as the answers do.
        assert any("serving model shapes version 1 (ssdlite320" in r.getMessage() for r in caplog.records)

    run(go())

    async def named_default():
        # A default named by the operator that failed: the default route cannot serve, not ready.
        async with serving(repo_settings(tmp_path, default_model="aa_broken")) as client:
            not_ready = await client.get("/readyz")
            assert not_ready.status_code == 503
            assert "aa_broken" in not_ready.json()["error"]["message"]

    run(named_default())
