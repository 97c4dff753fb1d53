"""Every manifest under deploy/k8s/, checked offline.

- Kubernetes' own kinds against the API schemas that kubernetes-validate ships, strict (unknown fields
  fail), for Kubernetes KUBERNETES.
- KServe's kinds against the openAPIV3Schema of KServe's CRDs (tests/schemas/kserve/, from the v0.20.0
  release), closed the way strict field validation (kubectl apply --validate=strict) closes them, with
  the list rules of x-kubernetes-list-type; their metadata as Kubernetes' ObjectMeta.
- Kinds with no schema here fail, unless UNCHECKED names them.
- Then the KServe rules that no schema states: the runtime's REST port first, template placeholders
  KServe can fill, an InferenceService's runtime, format and protocol served by that runtime, and the
  Standard deployment mode where the runtime has more than one port.
"""

import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted(p for p in (ROOT / "deploy" / "k8s").rglob("*") if p.suffix in (".yaml", ".yml"))
KSERVE_SCHEMAS = Path(__file__).parent / "schemas" / "kserve"  # <kind>-<group>-<version>.json
KSERVE_GROUP = "serving.kserve.io"
KUBERNETES = "1.33"  # the oldest Kubernetes the manifests must apply to
# Kinds whose schema is not carried here, each named so that any other unknown kind fails.
UNCHECKED = {("monitoring.coreos.com/v1", "PodMonitor")}
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # what KServe's controller knows
DEPLOYMENT_MODES = {"Standard", "RawDeployment", "Knative", "Serverless", "ModelMesh"}
RAW_MODES = {"Standard", "RawDeployment"}  # RawDeployment: the spelling before KServe 0.16
STORAGE = re.compile(
    r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|(s3|gs|file|https?|hdfs|webhdfs|oci(\+\w+)?|hf)://\S+"
)
# The runtime container is run through Go text/template with the InferenceService's ObjectMeta.
# In that JSON a quoted key reads \"key\": {{index .Labels \"app.kubernetes.io/name\"}}.
PLACEHOLDER = re.compile(
    r"\{\{-? *(\.Name|\.Namespace|\.(Labels|Annotations)\.(\w+)"
    r"|index \.(Labels|Annotations) \\\"([^\"\\]+)\\\") *-?\}\}"
)
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def load_documents():
    docs = []
    for path in MANIFESTS:
        for index, doc in enumerate(yaml.load_all(path.read_text(), Loader=LOADER)):
            if doc is not None:
                docs.append((f"{path.relative_to(ROOT)}#{index}", doc))
    return docs


DOCUMENTS = load_documents()


def of_kind(*kinds):
    return {d["metadata"]["name"]: d for _, d in DOCUMENTS if d.get("kind") in kinds}


# --- KServe's CRD schemas, closed ---------------------------------------------------------------


def closed(schema):
    """The schema with every object that lists its properties closed to others, as strict field
    validation rejects unknown fields; objects that keep unknown fields, or say what other
    properties may be, stay open."""
    schema = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in schema:
            schema[key] = {name: closed(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = closed(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [closed(sub) for sub in schema[key]]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    return schema


def list_type(validator, kind, instance, schema):
    """x-kubernetes-list-type: no two items of a set alike, no two items of a map with the same keys
    (a key left out counts as its default, as the API server defaults it before checking)."""
    if not isinstance(instance, list) or kind not in ("set", "map"):
        return
    seen = set()
    for item in instance:
        if kind == "set":
            key = json.dumps(item, sort_keys=True)
        else:
            fields = schema.get("items", {}).get("properties", {})
            key = tuple(
                item.get(k, fields.get(k, {}).get("default")) for k in schema["x-kubernetes-list-map-keys"]
            )
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate item {key} in a list of type {kind}")
        seen.add(key)


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-type": list_type}
)


@cache
def kserve_validator(api_version, kind):
    group, _, version = api_version.partition("/")
    path = KSERVE_SCHEMAS / f"{kind.lower()}-{group}-{version}.json"
    if not path.exists():
        return None
    return KubernetesValidator(closed(json.loads(path.read_text())))


def problems(validator, doc, where):
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    return [f"{where} {'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors]


def kubernetes_problems(doc, where):
    """kubernetes-validate's strict verdict (a kind it has no schema for is a problem too)."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where} {'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}; carry a schema or add the kind to UNCHECKED"]
    return []


# --- schemas ------------------------------------------------------------------------------------


def test_the_manifests_and_schemas_are_found():
    found = {str(p.relative_to(ROOT)) for p in MANIFESTS}
    assert {"deploy/k8s/detector.yaml", "deploy/k8s/kserve/servingruntime.yaml"} <= found, found
    assert "deploy/k8s/kserve/inferenceservice.yaml" in found, found
    assert kserve_validator(f"{KSERVE_GROUP}/v1alpha1", "ServingRuntime")
    assert kserve_validator(f"{KSERVE_GROUP}/v1beta1", "InferenceService")


def test_the_validators_reject_unknown_fields_and_duplicates():
    """The checks below are only worth something if they can fail: typos (in a KServe spec, in a core
    kind's metadata and spec) and a duplicate list key are caught. kubernetes-validate stops at a
    document's first error, hence one typo at a time."""
    runtime = json.loads(json.dumps(next(iter(of_kind("ServingRuntime").values()))))
    runtime["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    runtime["spec"]["containers"][0]["env"] *= 2
    found = problems(kserve_validator(runtime["apiVersion"], "ServingRuntime"), runtime, "runtime")
    assert any("imagePullPolicyy" in p for p in found) and any("duplicate" in p for p in found), found
    pod = {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "Always"}]}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "lables": {}}}
    deployment["spec"] = {"selector": {}, "template": {"spec": pod}}
    found = kubernetes_problems(deployment, "deployment")
    assert any("lables" in p for p in found), found
    deployment["metadata"].pop("lables")
    found = kubernetes_problems(deployment, "deployment")
    assert any("imagePullPolicyy" in p for p in found), found


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[where for where, _ in DOCUMENTS])
def test_manifest_matches_its_schema(where, doc):
    assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), where
    api_version, kind, name = doc["apiVersion"], doc["kind"], doc["metadata"].get("name", "")
    assert DNS1123_LABEL.fullmatch(name) and len(name) <= 63, f"{where}: name {name!r}"
    group = api_version.rpartition("/")[0]
    if group == KSERVE_GROUP:
        validator = kserve_validator(api_version, kind)
        assert validator, f"{where}: no schema for {api_version} {kind} in {KSERVE_SCHEMAS}"
        # The CRD leaves metadata open: check it as the ObjectMeta the API server reads it as.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        found = problems(validator, doc, where) + kubernetes_problems(meta, where)
    elif (api_version, kind) in UNCHECKED:
        pytest.skip(f"no schema carried for {api_version} {kind}")
    else:
        # kubernetes-validate drops the domain of a group (example.com/v1 would read as "example"):
        # only Kubernetes' own groups go to it, so that no custom kind passes as a built-in one.
        assert "." not in group or group.endswith(".k8s.io"), (
            f"{where}: {api_version} {kind} has no schema here; carry one or add it to UNCHECKED"
        )
        found = kubernetes_problems(doc, where)
    assert not found, "\n".join(found)


# --- the KServe rules no schema states ----------------------------------------------------------


def kserve_container(runtime):
    containers = [c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container"]
    assert len(containers) == 1, "the container KServe fills in and mounts the model into"
    return containers[0]


def placeholders(container):
    """The labels and annotations that the container's template actions name, each action checked
    on the container's JSON, the text KServe templates."""
    text = json.dumps(container)
    actions = re.findall(r"\{\{.*?\}\}", text)
    assert text.count("{{") == len(actions), f"an unclosed {{{{ in {text[text.rfind('{{') :][:60]}"
    bad = [a for a in actions if not PLACEHOLDER.fullmatch(a)]
    assert not bad, (
        f"{[a[:60] for a in bad]}: not fields of the InferenceService's metadata (.Name, .Labels.key, ...)"
    )
    named = []  # (Labels or Annotations, key)
    for action in actions:
        match = PLACEHOLDER.fullmatch(action)
        if match[2] or match[4]:
            named.append((match[2], match[3]) if match[2] else (match[4], match[5]))
    return named


RUNTIMES = of_kind("ServingRuntime", "ClusterServingRuntime")
SERVICES = of_kind("InferenceService")


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_serving_runtime_follows_kserve_rules(name):
    spec = RUNTIMES[name]["spec"]
    protocols = spec.get("protocolVersions", [])
    assert set(protocols) <= PROTOCOLS, protocols
    container = kserve_container(RUNTIMES[name])
    ports = container.get("ports", [])
    # With none KServe assumes 8080; the first is the one the predictor Service exposes on port 80.
    assert ports, "declare the ports: KServe assumes 8080 otherwise"
    assert not re.search("grpc|h2c", ports[0].get("name", "")), "the REST port comes first"
    if any(p.startswith("grpc") for p in protocols):
        assert any(re.search("grpc|h2c", p.get("name", "")) for p in ports[1:]), "no port named grpc"
    placeholders(container)
    # KServe's webhook refuses two runtimes that auto-select one format at one priority.
    for other, other_runtime in RUNTIMES.items():
        if other == name:
            continue
        for mine in spec["supportedModelFormats"]:
            for theirs in other_runtime["spec"]["supportedModelFormats"]:
                same = all(mine.get(k) == theirs.get(k) for k in ("name", "version", "priority"))
                shared = set(protocols) & set(other_runtime["spec"].get("protocolVersions", ["v1"]))
                assert not (mine.get("autoSelect") and theirs.get("autoSelect") and same and shared), other


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_serving_runtime_runs_the_detector_as_kserve_calls_it(name):
    container = kserve_container(RUNTIMES[name])
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    assert container["ports"][0]["containerPort"] == 8000  # the image's `ssd serve --port 8000`
    assert env.get("SSD_MODEL_NAME") == "{{.Name}}"  # served as /v2/models/<InferenceService name>
    model = env.get("SSD_MODEL_PATH") or env.get("SSD_MODEL_DIR") or ""
    assert model.startswith("/mnt/models"), "KServe puts the storageUri's model under /mnt/models"
    if "grpc-v2" in RUNTIMES[name]["spec"]["protocolVersions"]:
        assert env.get("SSD_GRPC_PORT") == str(ports.get("grpc")), f"SSD_GRPC_PORT {env.get('SSD_GRPC_PORT')}"
    for probe, path in [("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")]:
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", 8000), (probe, get)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_inference_service_is_served_by_its_runtime(name):
    isvc = SERVICES[name]
    # KServe's own name rule, and the Standard mode's Service <name>-predictor must be a valid name.
    assert DNS1035_LABEL.fullmatch(name) and len(f"{name}-predictor") <= 63, name
    model = isvc["spec"]["predictor"].get("model")
    assert model, "predictor.model: the detector runs as a model on a ServingRuntime"
    fmt = model["modelFormat"]

    def serves(f):
        return f["name"] == fmt["name"] and ("version" not in fmt or f.get("version") == fmt["version"])

    if "runtime" in model:
        assert model["runtime"] in RUNTIMES, f"no runtime {model['runtime']} in deploy/k8s/"
        runtime = RUNTIMES[model["runtime"]]
        assert any(serves(f) for f in runtime["spec"]["supportedModelFormats"]), (
            f"{model['runtime']}: no {fmt}"
        )
    else:
        chosen = [
            r
            for r in RUNTIMES.values()
            if any(serves(f) and f.get("autoSelect") for f in r["spec"]["supportedModelFormats"])
        ]
        assert chosen, f"no runtime here auto-selects {fmt}; name one in predictor.model.runtime"
        runtime = chosen[0]
    # Without protocolVersion KServe takes the runtime's; a runtime that lists none speaks any.
    protocol, protocols = model.get("protocolVersion"), runtime["spec"].get("protocolVersions")
    assert not (protocol and protocols) or protocol in protocols, f"the runtime does not speak {protocol}"
    assert STORAGE.fullmatch(model.get("storageUri", "")), model.get("storageUri")

    annotations = isvc["metadata"].get("annotations", {})
    mode = annotations.get("serving.kserve.io/deploymentMode")
    assert mode is None or mode in DEPLOYMENT_MODES, mode
    ports = kserve_container(runtime).get("ports", []) + model.get("ports", [])
    if len(ports) > 1:  # Knative allows one container port, and is the install's default
        assert mode in RAW_MODES, f"{len(ports)} ports need serving.kserve.io/deploymentMode: Standard"
    if mode in RAW_MODES:  # "true" sets prometheus.io/port to Knative's queue-proxy, 9091
        scraping = annotations.get("serving.kserve.io/enable-prometheus-scraping")
        assert scraping != "true", "enable-prometheus-scraping: true scrapes 9091, absent in Standard mode"

    # The merged container is templated: its own placeholders too, and every label or annotation
    # named must be there (a missing one becomes "<no value>").
    for field, key in placeholders(kserve_container(runtime)) + placeholders(model):
        assert key in isvc["metadata"].get(field.lower(), {}), f"{{{{.{field}.{key}}}}} is not set"


# --- Grace periods -------------------------------------------------------------------------------


def _duration_s(value: object) -> float:
    """A compose duration ("40s", "1m30s") or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", str(value))
    assert parts and any(parts.groups()), f"unreadable duration {value!r}"
    return 60 * float(parts[1] or 0) + float(parts[2] or 0)


def _needed_grace_s(env: dict[str, str]) -> float:
    """SSD_DRAIN_S + SSD_SHUTDOWN_TIMEOUT_S (as set, else the defaults) + 5 s to exit."""
    from service.settings import Settings

    defaults = Settings.model_fields
    drain = float(env.get("SSD_DRAIN_S", defaults["drain_s"].default))
    shutdown = float(env.get("SSD_SHUTDOWN_TIMEOUT_S", defaults["shutdown_timeout_s"].default))
    return drain + shutdown + 5


def _env(containers: list[dict]) -> dict[str, str]:
    return {e["name"]: str(e.get("value", "")) for c in containers for e in c.get("env", [])}


def grace_periods() -> list[tuple[str, float, float]]:
    """(where, the grace period given, the one needed) for every place that runs the service."""
    found = []
    runtime_env = {}
    for _, doc in DOCUMENTS:
        if doc.get("kind") == "ServingRuntime":
            runtime_env = _env(doc["spec"]["containers"])
    for where, doc in DOCUMENTS:
        kind = doc.get("kind")
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
            given = pod.get("terminationGracePeriodSeconds", 30)
            found.append((where, given, _needed_grace_s(_env(pod["containers"]))))
        elif kind == "InferenceService":
            predictor = doc["spec"]["predictor"]
            env = runtime_env | _env([predictor.get("model", {})])
            found.append((where, predictor.get("terminationGracePeriodSeconds", 30), _needed_grace_s(env)))
    compose = yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=LOADER)
    for name, service in compose["services"].items():
        if str(service.get("image", "")).split(":")[0] == "ssd-detector":  # the serving image
            env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
            grace = _duration_s(service.get("stop_grace_period", "10s"))
            found.append((f"docker-compose.yml#{name}", grace, _needed_grace_s(env)))
    return found


def test_grace_periods_cover_the_drain_and_the_shutdown():
    """A container stopped (docker compose stop, a pod deleted) gets SIGTERM, then SIGKILL after
    its grace period: that must cover the drain (SSD_DRAIN_S), the work in progress
    (SSD_SHUTDOWN_TIMEOUT_S) and 5 s to exit, or the last requests are killed unanswered."""
    periods = grace_periods()
    assert {w.split("#")[0] for w, _, _ in periods} >= {
        "deploy/k8s/detector.yaml",
        "deploy/k8s/kserve/inferenceservice.yaml",
        "docker-compose.yml",
    }
    short = [(where, given, needed) for where, given, needed in periods if given < needed]
    assert not short, short
