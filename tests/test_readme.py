"""The README's first Python example runs as written (the second needs torchvision's download; the
tritonclient one runs in tests/test_tritonclient.py)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # Triton's client example runs in its own environment (tests/test_tritonclient.py).
    blocks = [b for b in blocks if "tritonclient" not in b]
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    detections = namespace["detections"]
    assert detections.boxes.shape == (2, 200, 4)
    assert namespace["loss"].num_positives > 0


def test_readme_curl_answer_is_the_demo_models_real_answer():
    """The quickstart's JSON is what the committed demo model answers for the demo image."""
    import asyncio
    import json

    from test_service import serving, settings

    root = README.parent
    text = README.read_text()
    shown = json.loads(re.search(r"```json\n(.*?)```", text, flags=re.S).group(1))
    image = (root / "docs" / "images" / "demo_scene.jpg").read_bytes()

    async def ask() -> dict:
        async with serving(settings(root / "models" / "demo.onnx")) as client:
            response = await client.post("/detect", content=image, headers={"Content-Type": "image/jpeg"})
            return response.json()

    answer = asyncio.run(ask())
    assert answer["model"]["sha256"].startswith(shown["model"]["sha256"].rstrip("."))
    got, want = answer["results"][0]["detections"], shown["results"][0]["detections"]
    assert [d["label"] for d in got] == [d["label"] for d in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g["score"] - w["score"]) < 1e-3
        assert max(abs(a - b) for a, b in zip(g["box"], w["box"], strict=True)) < 0.5
