"""docs/reference.md's tables against the code: a code the service can answer is in the table of
error codes, with its HTTP status and its gRPC status, and the table has no other; the commands
table is the parser's list."""

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
