"""The README's first Python example runs as written (the second needs torchvision's download; the
tritonclient one runs in tests/test_tritonclient.py), its quickstart answer is the demo model's,
and docs/testing.md lists the tests marked timing-dependent. The reference's tables are checked
in tests/test_reference.py."""

import ast
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
TESTING = README.parent / "docs" / "testing.md"


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


def _marks_timing(decorators: list[ast.expr]) -> bool:
    return any(ast.unparse(d) == "pytest.mark.timing" for d in decorators)


def timing_tests() -> set[str]:
    """``tests/FILE.py::NAME`` for each test marked timing, or ``tests/FILE.py`` for a module
    marked whole (``pytestmark``)."""
    marked = set()
    for path in sorted((README.parent / "tests").glob("test_*.py")):
        where = f"tests/{path.name}"
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and "pytestmark" in {ast.unparse(t) for t in node.targets}:
                decorators = node.value if isinstance(node.value, ast.List) else ast.List([node.value])
                if _marks_timing(decorators.elts):
                    marked.add(where)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _marks_timing(
                node.decorator_list
            ):
                marked.add(f"{where}::{node.name}")
    return marked


def test_the_timing_dependent_tests_are_listed_with_what_they_assume():
    table = re.search(r"## Timing-dependent tests\n(.*?)(\n## |\Z)", TESTING.read_text(), flags=re.S)
    assert table, "docs/testing.md has no table of timing-dependent tests"
    rows = [line.split("|") for line in table.group(1).splitlines() if line.startswith("| tests/")]
    listed = {cells[1].split()[0] for cells in rows}
    assert all(len(cells) == 5 and cells[2].strip() and cells[3].strip() for cells in rows)
    assert listed == timing_tests()
