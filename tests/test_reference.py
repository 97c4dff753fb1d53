"""docs/reference.md's tables against the code, each both ways (nothing missing, nothing extra):
the commands (the parser), the artifact's metadata (the exporter and the loader), the routes
(the application) and /detect's parameters, the OpenAPI schema (docs/openapi.json), the OIP's
methods and status mapping (the gRPC service), the settings (the settings model), the metrics
(the registry), the error codes (every code the service's source can answer) and the rejection
reasons."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"


def _table() -> dict[str, tuple[int, str]]:
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| ([A-Z_-]+) \|", REFERENCE.read_text(), flags=re.M)
    return {code: (int(status), grpc) for code, status, grpc in rows}


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _codes_in_the_service() -> set[str]:
    """Every error code the service's source can answer with: APIError's code argument, anything
    assigned to a ``code`` (the image errors, the refusals, the protocol's 408 and 431), the codes
    of bodies written by hand, and the default codes by status."""
    from service.errors import _CODES

    found = set(_CODES.values())
    for path in (ROOT / "service").rglob("*.py"):
        if "_pb2" in path.name:
            continue
        source = path.read_text()
        found |= set(re.findall(r'"code": "([a-z_]+)"', source))
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "APIError"
            ):
                code = (
                    node.args[2]
                    if len(node.args) > 2
                    else next((k.value for k in node.keywords if k.arg == "code"), None)
                )
                if code is not None:
                    found |= _strings(code)
            if isinstance(node, ast.Assign):
                names = [t for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)]
                if any(n.id == "code" for n in names):
                    found |= {s for s in _strings(node.value) if re.fullmatch(r"[a-z]+(_[a-z]+)+|[a-z]+", s)}
    return found - {"error"}  # APIError's fallback for a status with no code of its own


def test_every_error_code_the_service_answers_is_in_the_reference():
    table = _table()
    assert len(table) > 15, "docs/reference.md has no table of error codes"
    assert _codes_in_the_service() == set(table)


def test_the_reference_gives_each_code_its_status_and_grpc_status():
    import grpc

    from service.errors import _CODES
    from service.oip.grpc import CODES

    defaults = {code: status for status, code in _CODES.items()}  # a status's code when none is given
    for code, (status, grpc_status) in _table().items():
        assert defaults.get(code, status) == status, code
        if grpc_status != "-":
            assert CODES.get(status, grpc.StatusCode.INTERNAL).name == grpc_status, code


def test_the_openapi_schema_is_clean_and_every_operation_has_an_id_of_its_own():
    """The schema code generators read: no duplicate operation ids (FastAPI warns of them), the
    HEAD twins of GET routes left out, the inference routes in."""
    import warnings

    from service.app import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a duplicate operation id is a UserWarning
        schema = create_app().openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert all("head" not in path for path in schema["paths"].values())
    assert {"/detect", "/v2/models/{name}/infer", "/readyz", "/metrics"} <= set(schema["paths"])


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers there, and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_commands_table_is_the_parsers():
    import cli

    parsed = set()
    for name, sub in _subcommands(cli.build_parser()).items():
        parsed.add(f"ssd {name}")
        parsed |= {f"ssd {name} {inner}" for inner in _subcommands(sub)}
    documented = set(re.findall(r"^\| `(ssd [a-z -]+)` \|", REFERENCE.read_text(), flags=re.M))
    assert documented == parsed


def _shown(value: object) -> str | None:
    """A setting's default as the reference's table writes it in backticks (None: in words)."""
    if value is None or value == {}:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_the_settings_table_is_the_settings_model():
    """Every SSD_ variable the service reads is in the reference's table, with its default, and the
    table has no other."""
    from service.settings import Settings

    rows = dict(re.findall(r"^\| `(SSD_[A-Z0-9_]+)` \| ([^|]*) \|", REFERENCE.read_text(), flags=re.M))
    fields = {f"SSD_{name.upper()}": field.default for name, field in Settings.model_fields.items()}
    assert rows.keys() == fields.keys()
    for name, default in fields.items():
        written = re.match(r"`([^`]*)`", rows[name].strip())
        if _shown(default) is None:
            assert written is None, f"{name}: no default, but the table gives {rows[name]!r}"
        else:
            assert written and written.group(1) == _shown(default), f"{name}: {default!r}, not {rows[name]!r}"


def _metric_objects() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name: (type, label names) of every detector_ metric a Metrics object registers."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    found = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase) and value._name.startswith("detector_"):
            suffix = "_total" if value._type == "counter" else ""
            found[value._name + suffix] = (value._type, tuple(value._labelnames))
    return found


def test_the_metrics_table_is_the_registry():
    """Every detector_ metric the service exposes is in the reference's table with its type and
    labels, and the table has no other; nothing else on the page names a metric it lacks."""
    from service.metrics import Metrics

    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
        if family.name.startswith("detector_")
    }
    objects = _metric_objects()
    assert set(objects) == exposed
    text = REFERENCE.read_text()
    rows = re.findall(r"^\| `(detector_[a-z_]+)` \| ([a-z]+) \|([^|]*)\|", text, flags=re.M)
    table = {name: (kind, tuple(re.findall(r"`([a-z0-9_]+)`", labels))) for name, kind, labels in rows}
    assert table == objects
    assert set(re.findall(r"`(detector_[a-z_]+)", text)) <= exposed


def _rows(heading: str) -> list[list[str]]:
    """The cells of the first table under ``## heading``, header and rule left out."""
    section = re.search(
        rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", REFERENCE.read_text(), flags=re.M | re.S
    )
    assert section, f"docs/reference.md has no section {heading!r}"
    lines = [line for line in section.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_metadata_table_is_what_the_exporter_writes_and_the_loader_requires():
    from export.metadata import build_metadata
    from model.postprocess import PostprocessConfig
    from service.artifact import REQUIRED_METADATA

    written = build_metadata(
        model_name="m", classes=["a"], input_size=(320, 320), config=PostprocessConfig(), source="s"
    )
    rows = [row for row in _rows("The model artifact") if len(row) == 3 and row[1] in ("yes", "no")]
    table = {_ticked(row[0])[0]: row[1] == "yes" for row in rows}
    assert set(table) == set(written)
    assert {key for key, required in table.items() if required} == set(REQUIRED_METADATA)


def _app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the application serves, HEAD left out."""
    from service.app import create_app

    found = set()

    def walk(routes: list) -> None:
        for route in routes:
            inner = getattr(route, "routes", None) or getattr(
                getattr(route, "original_router", None), "routes", None
            )
            if inner is not None and not hasattr(route, "path"):
                walk(inner)  # an included router, as FastAPI keeps it
                continue
            found.update((method, route.path) for method in route.methods - {"HEAD"})

    walk(create_app().router.routes)
    return found


def test_the_routes_table_is_the_applications():
    table = {
        (row[0].strip("`"), path) for row in _rows("HTTP API") if len(row) == 3 for path in _ticked(row[1])
    }
    table = {(method, path) for method, path in table if method in ("GET", "POST", "PUT", "DELETE")}
    routes = _app_routes()
    # /v2/ is the OIP's own spelling of /v2 (tritonclient asks for /v2), kept out of the schema.
    assert table == routes - {("GET", "/v2/")}


def test_the_detect_parameters_table_is_the_routes():
    from service import detect

    rows = _rows("HTTP API")
    parameters = {
        _ticked(row[0])[0] for row in rows if len(row) == 3 and row[1] in ("number", "integer", "string")
    }
    assert parameters == detect.NAMES


def test_the_committed_openapi_schema_is_the_services():
    """docs/openapi.json is what the service serves (``make openapi`` writes it), and it describes
    /detect although FastAPI's routing never answers it: the body's types, the answer, the errors
    in the service's own form."""
    import json

    from service.app import create_app
    from service.detect import NAMES

    served = create_app().openapi()
    assert json.loads((ROOT / "docs" / "openapi.json").read_text()) == served, "run make openapi"
    detect = served["paths"]["/detect"]["post"]
    assert {"image/*", "multipart/form-data", "application/octet-stream"} <= set(
        detect["requestBody"]["content"]
    )
    assert {p["name"] for p in detect["parameters"]} == NAMES
    assert detect["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/DetectResponse"
    )
    for status in ("400", "413", "415", "422", "503", "504"):
        assert detect["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert "HTTPValidationError" not in json.dumps(served)
    infer = served["paths"]["/v2/models/{name}/infer"]["post"]
    assert "422" not in infer["responses"]
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ProtocolError"
    )


def test_the_oip_table_lists_every_grpc_method_the_service_answers():
    from service.oip.grpc import Servicer
    from service.oip.proto import open_inference_grpc_pb2 as pb

    methods = {row[2].strip("`") for row in _rows("The Open Inference Protocol") if len(row) == 4}
    served = {name for name in vars(Servicer) if name[:1].isupper()}
    protocol = set(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name)
    assert methods == served
    assert protocol <= served  # every method of the protocol's own service definition


def test_the_oip_status_table_is_the_grpc_mapping():
    from service.oip.grpc import CODES

    table = {
        int(row[0]): row[1]
        for row in _rows("The Open Inference Protocol")
        if len(row) == 2 and row[0].isdigit()
    }
    assert table == {status: code.name for status, code in CODES.items()}


def _reasons_in_the_service() -> set[str]:
    """Every reason the service's source counts a rejection under, besides the codes themselves:
    the renamed codes, ``reason=`` arguments, and the connection cuts' reasons."""
    from service.errors import REASONS
    from service.server import ACCEPT_LIMITS

    found = set(REASONS.values()) | set(ACCEPT_LIMITS.values())
    for path in (ROOT / "service").rglob("*.py"):
        if "_pb2" in path.name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in ("_guard_cut", "_count", "dropped", "cut"):
                found |= {
                    a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                }
            found |= {
                k.value.value
                for k in node.keywords
                if k.arg == "reason" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)
            }
    return {reason for reason in found if re.fullmatch(r"[a-z_]+", reason)}


def test_the_rejection_reasons_table_is_the_services():
    table = {
        _ticked(row[0])[0] for row in _rows("Rejection reasons") if len(row) == 2 and row[0].startswith("`")
    }
    counted = _reasons_in_the_service()
    # Every reason that is not an error code of its own is listed, and no row is made up.
    assert counted - set(_table()) <= table <= counted
