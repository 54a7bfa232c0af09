"""Real answers of the daemon checked against its own OpenAPI document.

Why it exists: ``watcher/http/openapi.json`` is what clients generate their decoders
from, so every answer a test receives must be one the document allows: its status code
listed for the operation, its body valid against that response's schema (an OpenAPI 3.0
schema validator, with ``$ref`` resolved in the document), its documented headers present.
Tests that replay clients call ``check_answer`` on each answer they read.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS30Validator, validate

DOCUMENT = Path(__file__).resolve().parents[1] / "watcher" / "http" / "openapi.json"


@cache
def document() -> dict[str, Any]:
    return dict(json.loads(DOCUMENT.read_text()))


@cache
def _templates() -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$"),
                  path) for path in document()["paths"])


def _resolve(value: Any) -> Any:
    """``value`` with every ``$ref`` of the document replaced by what it points at."""
    if isinstance(value, dict):
        if "$ref" in value:
            target: Any = document()
            for part in value["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolve(target)
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item) for item in value]
    return value


def operation(method: str, path: str) -> dict[str, Any]:
    """The documented operation serving ``method path`` (a concrete path; a query is
    ignored); AssertionError when the document has none."""
    bare = path.split("?", 1)[0]
    for pattern, template in _templates():
        if pattern.fullmatch(bare):
            operations = document()["paths"][template]
            assert method.lower() in operations, f"{method} {template} is not documented"
            return dict(_resolve(operations[method.lower()]))
    raise AssertionError(f"{bare} is not a documented path")


def check_answer(method: str, path: str, status: int, headers: dict[str, str],
                 body: Any) -> None:
    """AssertionError unless the answer is one the document allows for the operation.

    ``body`` is the decoded JSON (or bytes for a non-JSON answer); ``headers`` are the
    answer's (any case).
    """
    answer = operation(method, path)["responses"].get(str(status))
    assert answer is not None, f"{method} {path}: status {status} is not documented: {body!r}"
    present = {name.lower() for name in headers}
    for name in answer.get("headers", {}):
        assert name.lower() in present, f"{method} {path} {status}: no {name} header"
    content = answer.get("content", {})
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        validate(body, schema, cls=OAS30Validator)
