"""Where logs and spans go: set up once per process at start-up, never at import time.

``watcher.telemetry`` hands out the logger, tracer and metrics every floor records into;
this module decides how they leave the process. Logs are structlog events rendered as JSON
lines on stderr for the journal (or readable lines on a terminal); CLI commands set them up
too, so their stdout carries results only. Log lines carry the ids of the current span, so
a log line leads to its trace. Spans go to an OTLP/HTTP collector when one is
configured. AMQP messages carry W3C trace context from publishers, which
``context_from_amqp_headers`` turns into the parent of the work a message causes.

``StateTransitionLog`` keeps retry loops quiet: a failure is logged when it starts and a
recovery when it ends, not on every attempt in between.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from watcher import __version__, telemetry
from watcher.settings import LOG_LEVELS, TracingSettings

_LEVELS = {name: logging.getLevelName(name.upper()) for name in LOG_LEVELS}


def _numeric_level(level: str) -> int:
    """The standard-library level of a ``LOG_LEVELS`` name; ``ValueError`` for another."""
    try:
        return int(_LEVELS[level.lower()])
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}") from None

_PROPAGATOR = TraceContextTextMapPropagator()
# Marks the handler this module installs so a second configure_logging replaces it.
_HANDLER_NAME = "libvirt-volume-watcher"


def add_trace_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: add ``trace_id`` and ``span_id`` (hex) of the current span."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(span_context.span_id, "016x"))
    return event_dict


def configure_logging(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Route structlog and standard-library logging to ``stream`` (default: stderr).

    ``json=None`` picks JSON lines when the stream is not a terminal (the journal, a file)
    and the coloured console renderer when it is. Library loggers (aio-pika, urllib3,
    asyncio) go through the same renderer, so every line of the process has one shape.
    Calling it again replaces the previous setup.
    """
    numeric_level = _numeric_level(level)
    out = stream if stream is not None else sys.stderr
    is_terminal = bool(getattr(out, "isatty", lambda: False)())
    if json is None:
        json = not is_terminal

    # Shared by our events and by records from standard-library loggers.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
        final: list[Any] = [structlog.processors.format_exc_info,
                            structlog.processors.UnicodeDecoder(), renderer]
        if _is_journal(out):
            final.append(_journal_priority)
    else:
        # The console renderer formats exceptions itself (with colour when available).
        final = [structlog.dev.ConsoleRenderer(colors=is_terminal)]

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        # Not cached: a logger bound before configure_logging still follows the new setup.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def set_log_level(level: str) -> bool:
    """Change the level of the running process's logs (``configure_logging`` done before);
    False when it already was ``level``. ``ValueError`` for an unknown level."""
    numeric_level = _numeric_level(level)
    root = logging.getLogger()
    if root.level == numeric_level:
        return False
    root.setLevel(numeric_level)
    return True


_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2,
               "exception": 3}


def _journal_priority(logger: Any, method_name: str, rendered: Any) -> Any:
    """Prefix a rendered line with ``<N>``: journald takes N as the syslog priority and
    strips it, so ``journalctl -p err`` finds our errors."""
    return f"<{_PRIORITIES.get(method_name, 6)}>{rendered}"


def _is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"


def configure_tracing(
    settings: TracingSettings,
    *,
    service_name: str = "libvirt-volume-watcher",
    exporter: SpanExporter | None = None,
    host_name: str | None = None,
) -> TracerProvider:
    """Install the global tracer provider and return it (the daemon shuts it down on exit).

    An explicit ``exporter`` gets a synchronous processor (tests read spans right away);
    otherwise ``settings.otlp_endpoint`` gets a batching OTLP/HTTP exporter; with neither,
    spans are still created (so log lines carry trace ids) but never exported.
    OpenTelemetry allows one global provider per process: call this once.
    """
    attributes = {"service.name": service_name, "service.version": __version__}
    if host_name:
        attributes["host.name"] = host_name  # the fleet's name for this host
    resource = Resource.create(attributes)
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif settings.otlp_endpoint:
        # Imported here: the exporter is an optional extra, not a core dependency.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_traces_url(settings.otlp_endpoint))))
    trace.set_tracer_provider(provider)
    return provider


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL for ``endpoint``: a bare collector address gets ``/v1/traces``.

    Operators write ``http://tempo:4318`` as for ``OTEL_EXPORTER_OTLP_ENDPOINT``; a URL
    with a path is taken as the full traces URL.
    """
    endpoint = endpoint.strip()
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def context_from_amqp_headers(headers: Mapping[str, object] | None) -> otel_context.Context:
    """The trace context carried by an AMQP message's ``traceparent``/``tracestate`` headers.

    Header names are matched case-insensitively and values may be ``bytes`` or ``str``.
    Without a valid ``traceparent`` the result is an empty context, so the span started
    with it becomes a new root rather than a child of whatever happens to be current.
    """
    carrier: dict[str, str] = {}
    for name, value in (headers or {}).items():
        key = str(name).lower()
        if key not in ("traceparent", "tracestate"):
            continue
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                continue
        if isinstance(value, str):
            carrier[key] = value.strip()
    if "traceparent" not in carrier:
        return otel_context.Context()
    return _PROPAGATOR.extract(carrier, context=otel_context.Context())


def trace_headers(context: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace headers for ``context`` (default: the current one), for messages we publish."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


@dataclass
class _Failure:
    message: str
    since: float
    attempts: int


class StateTransitionLog:
    """Logs a failing operation once when it starts failing and once when it recovers.

    Connection and retry loops call ``failed`` on every attempt and ``ok`` on every
    success; only the transitions reach the log at error/info level, the repeats go to
    debug with their attempt count. Keys are free-form (``"libvirt"``, ``"amqp"``,
    ``"s3:vm-images"``) and independent of each other.
    """

    def __init__(self, logger: Any | None = None) -> None:
        self._log = logger if logger is not None else telemetry.get_logger()
        self._failures: dict[str, _Failure] = {}

    def failed(self, key: str, message: str, **kw: Any) -> bool:
        """Record a failure of ``key``; logs an error only if ``key`` was not failing.

        ``kw`` goes into the log event (``error=str(exc)``, ``exc_info=True``...).
        Returns whether this call logged.
        """
        failure = self._failures.get(key)
        if failure is not None:
            failure.attempts += 1
            self._log.debug(message, key=key, attempt=failure.attempts, **kw)
            return False
        self._failures[key] = _Failure(message, time.monotonic(), 1)
        self._log.error(message, key=key, **kw)
        return True

    def ok(self, key: str, message: str) -> bool:
        """Record a success of ``key``; logs "recovered" only if ``key`` was failing."""
        failure = self._failures.pop(key, None)
        if failure is None:
            return False
        self._log.info(message, key=key, recovered=True, attempts=failure.attempts,
                       failed_seconds=round(time.monotonic() - failure.since, 3))
        return True

    def is_failing(self, key: str) -> bool:
        return key in self._failures
