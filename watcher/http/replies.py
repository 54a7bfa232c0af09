"""What every answer of both listeners carries: a request id, and one shape for errors.

Why it exists: the predecessor's clients read ``{"error", "message", "code"}`` from every
4xx and 5xx (DESIGN.md, "Compatibility rule"), whichever part of the stack refused the
request: a handler (``ApiError``), aiohttp's routing (404, 405), a body limit (413), or
aiohttp's own parser, which answers an unparsable request (400) or an oversized head
(431) before any middleware runs. This module shapes all of them, so no answer escapes
in another form:

- ``request_id``: the client's ``X-Request-ID`` when it is sane (1-128 of
  ``A-Za-z0-9._:-``), else a new uuid4; on every response, errors included, and in
  ``request[REQUEST_ID_KEY]`` for handlers and their log lines.
- ``shape_errors``: exceptions into error bodies. An unexpected exception is a 500 whose
  message names the request id; its traceback goes to the log, never into the body.
- ``protocol_error``: the body of the parser's own refusals (``watcher.http.listener``).
"""

from __future__ import annotations

import json
import re
import uuid
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler

from watcher import telemetry
from watcher.core.api_shapes import error_body

JSON = "application/json"
NO_STORE = {"Cache-Control": "no-store"}
REQUEST_ID = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
"""``request[REQUEST_ID_KEY]``: this request's id, for handlers and their log lines."""
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEPT_HEADERS = ("Allow", "WWW-Authenticate")

log = telemetry.get_logger(component="http")


class ApiError(Exception):
    """A refusal: answered ``status`` with ``{"error": error, "message": message, "code"}``.

    ``error`` is the short text (``watcher.core.api_shapes.SHORT_TEXTS`` by default).
    """

    def __init__(self, status: int, message: str, *, error: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error = int(status), message, error
        self.headers = headers or {}


def json_response(value: object, status: int = HTTPStatus.OK,
                  headers: dict[str, str] | None = None) -> web.Response:
    """``value`` as compact JSON, ``Content-Type: application/json`` exactly, never cached."""
    body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    return web.Response(body=body, status=status, content_type=JSON,
                        headers={**NO_STORE, **(headers or {})})


def error_response(status: int, message: str, *, error: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error_body(status, message, error), status, headers)


def protocol_error(status: int, message: str) -> web.Response:
    """aiohttp's own refusal of a request it could not parse, in the error shape; the
    connection is closed after it, as aiohttp does."""
    response = error_response(status, message, headers={REQUEST_ID: str(uuid.uuid4())})
    response.force_close()
    return response


@web.middleware
async def request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(REQUEST_ID, "")
    request[REQUEST_ID_KEY] = given if _SANE_REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
    response = await handler(request)
    if not response.prepared:
        response.headers[REQUEST_ID] = request[REQUEST_ID_KEY]
    return response


@web.middleware
async def shape_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, error=exc.error, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect or a success raised as an exception
        kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return error_response(exc.status, _message(request, exc), headers=kept)
    except Exception:
        telemetry.unexpected_errors.labels(unit="api").inc()
        log.exception("http request failed", request_id=request[REQUEST_ID_KEY],
                      method=request.method, path=request.path)
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                              "unexpected error; the daemon's log has it under request_id "
                              f"{request[REQUEST_ID_KEY]}")


def _message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == HTTPStatus.NOT_FOUND:
        return f"no route for {request.method} {request.path}"
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        return f"{request.method} is not allowed on {request.path}"
    text = exc.text or exc.reason
    return re.sub(r"^\d{3}: ", "", text.strip())
