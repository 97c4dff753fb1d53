"""The serving peers (bench/peers) answer the same photo with the same detections as ours: same
artifact, same decoding, same formatting; only the serving framework differs.

The server tests need the optional ``peers`` group (``uv sync --group peers``) for BentoML, and
PyTriton's own environment (``python -m bench.peers.pytriton_server --make-env``) for PyTriton.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from bench.peers import PEERS, PeerUnavailable
from bench.peers.smoke import LOW_THRESHOLD, found

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "photos" / "val2017" / "000000165518.jpg"  # photos/README.md


@pytest.fixture(scope="module")
def image() -> bytes:
    return PHOTO.read_bytes()


@pytest.fixture(scope="module")
def ours(image) -> list[dict]:
    return found(PEERS["ours"], ROOT / "models" / "demo.onnx", image, env=LOW_THRESHOLD)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bentoml", "pytriton"])
def test_peer_finds_what_ours_finds(name, image, request):
    if name == "bentoml":
        pytest.importorskip(
            "bentoml", reason="the optional peers group is not installed (uv sync --group peers)"
        )
    reason = PEERS[name].unavailable()
    if reason:
        pytest.skip(reason)
    ours = request.getfixturevalue("ours")  # started only when a peer can run
    theirs = found(PEERS[name], ROOT / "models" / "demo.onnx", image, env=LOW_THRESHOLD)
    assert len(ours) > 0
    assert len(theirs) == len(ours)
    assert theirs == ours  # the same boxes, scores and labels, to the digit


def test_pytriton_request_is_kserve_v2_binary():
    jpeg = b"\xff\xd8JPEG\xff\xd9"
    request = PEERS["pytriton"].request(jpeg, 8000)
    head, body = request.split(b"\r\n\r\n", 1)
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert head.startswith(b"POST /v2/models/ssd/infer HTTP/1.1")
    assert int(headers[b"Content-Length"]) == len(body)
    size = int(headers[b"Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert header["inputs"][0]["datatype"] == "BYTES"
    assert header["inputs"][0]["parameters"]["binary_data_size"] == len(body) - size
    assert body[size:] == len(jpeg).to_bytes(4, "little") + jpeg


def test_answers_are_parsed_or_refused():
    detection = {"label": "star", "class_id": 3, "score": 0.9, "box": [1, 2, 3, 4]}
    ours = {"model": {}, "results": [{"filename": None, "width": 4, "height": 4, "detections": [detection]}]}
    triton = {
        "outputs": [{"name": "result", "datatype": "BYTES", "shape": [1, 1], "data": [json.dumps(ours)]}]
    }
    assert PEERS["ours"].detections(200, json.dumps(ours).encode()) == 1
    assert PEERS["bentoml"].detections(200, json.dumps([ours]).encode()) == 1
    assert PEERS["pytriton"].detections(200, json.dumps(triton).encode()) == 1
    for peer in PEERS.values():
        with pytest.raises(ValueError):
            peer.detections(503, b'{"error": "queue full"}')
        with pytest.raises(ValueError):
            peer.detections(200, b'{"unexpected": true}')


def test_an_unavailable_peer_refuses_to_start():
    broken = dataclasses.replace(PEERS["ours"], name="broken", _unavailable=lambda: "no such thing here")
    assert broken.unavailable() == "no such thing here"
    with pytest.raises(PeerUnavailable, match="no such thing here"):
        broken.command(Path("m.onnx"), 1, 8, 5.0, 2)
