"""Every reach into Starlette's and FastAPI's internals, in one place (pyproject bounds their
versions; tests/test_conformance.py and tests/test_service.py pin what these return).

- ``route_template``: the matched route's path template. Starlette's router puts the route it
  matched in ``scope["route"]`` (FastAPI's included routers the original route): its ``path``
  is the template with any router prefix (``/v2/models/{name}/infer``).
- ``query_names``: the query parameters a FastAPI route declares, from its ``dependant`` (its
  own and its dependencies'), by the names clients send (aliases).
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

UNMATCHED = "unmatched"  # a path no route serves


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (after routing), or ``UNMATCHED``."""
    return getattr(scope.get("route"), "path", None) or UNMATCHED


def query_names(scope: Scope) -> frozenset[str] | None:
    """The query parameters the matched route takes, or None where it is not a FastAPI route."""
    dependant = getattr(scope.get("route"), "dependant", None)
    if dependant is None:
        return None
    return frozenset(param.alias for param in _query_params(dependant))


def _query_params(dependant: Any) -> list[Any]:
    params = list(getattr(dependant, "query_params", []))
    for sub in getattr(dependant, "dependencies", []):
        params += _query_params(sub)
    return params
