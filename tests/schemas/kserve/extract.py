"""Write the openAPIV3Schema of each served version of the given CustomResourceDefinitions as compact
JSON next to this file, named <kind>-<group>-<version>.json (kind in lower case, as kubernetes-validate
names its schemas); tests/test_k8s_manifests.py validates the KServe manifests against them.

    python tests/schemas/kserve/extract.py path/to/serving.kserve.io_servingruntimes.yaml ...

The schema is copied as it is: the test, not this script, closes it to unknown fields."""

import hashlib
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def main(paths: list[str]) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the InferenceService CRD is 2 MB of YAML
    for path in paths:
        data = Path(path).read_bytes()
        crd = yaml.load(data, Loader=loader)
        assert crd["kind"] == "CustomResourceDefinition", f"{path} is not a CustomResourceDefinition"
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        print(f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            out = HERE / f"{kind.lower()}-{group}-{version['name']}.json"
            text = json.dumps(version["schema"]["openAPIV3Schema"], separators=(",", ":")) + "\n"
            out.write_text(text)
            print(f"  {kind} {group}/{version['name']} -> {out.name} ({len(text)} bytes)")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
