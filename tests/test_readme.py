"""The README's first Python example runs as written (the second needs torchvision's download)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    detections = namespace["detections"]
    assert detections.boxes.shape == (2, 200, 4)
    assert namespace["loss"].num_positives > 0
