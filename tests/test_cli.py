import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_the_family(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "--json"])
    assert exit_info.value.code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ssd300_vgg16"]["default_boxes"] == 8732
    assert rows["ssd512_vgg16"]["default_boxes"] == 24564
    assert rows["ssdlite320_mobilenet_v3_large"]["feature_maps"][0] == [20, 20]
    assert set(rows) >= {"ssd300_vgg16", "ssd512_vgg16", "ssdlite320_mobilenet_v3_large", "ssd300_resnet50"}


def test_unknown_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "--bogus"])
    assert exit_info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("ssd")
    assert script.exists(), "run `uv sync`: the ssd script comes from [project.scripts]"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "models" in out.stdout
