"""Logs carry trace ids, AMQP trace headers parent our spans, retry loops log transitions."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import reset_global_tracer_provider
from watcher import telemetry
from watcher.runtime.observability import (
    StateTransitionLog,
    configure_logging,
    configure_tracing,
    context_from_amqp_headers,
    otlp_traces_url,
    set_log_level,
    trace_headers,
)
from watcher.settings import TracingSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# The ``spans`` fixture (a fresh provider with an in-memory exporter) is in tests/conftest.py.


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """JSON log lines written by configure_logging; the previous setup is restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging(json=True, level="info", stream=out)
    yield out
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


class TestLogLines:
    def test_a_json_line_inside_a_span_carries_its_trace_and_span_ids(
        self, log_output: io.StringIO, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        provider, _ = spans
        with provider.get_tracer("test").start_as_current_span("work") as span:
            telemetry.get_logger(domain="web-1").info("image written")
        [line] = _lines(log_output)
        context = span.get_span_context()
        assert line["trace_id"] == format(context.trace_id, "032x")
        assert line["span_id"] == format(context.span_id, "016x")
        assert line["domain"] == "web-1"

    def test_a_json_line_has_timestamp_level_logger_and_no_ids_outside_a_span(
        self, log_output: io.StringIO
    ) -> None:
        telemetry.get_logger().warning("cache almost full", used=0.93)
        [line] = _lines(log_output)
        assert line["event"] == "cache almost full"
        assert line["level"] == "warning"
        assert line["logger"] == "watcher"
        assert line["timestamp"].startswith("20") and "T" in line["timestamp"]
        assert "trace_id" not in line and "span_id" not in line

    def test_events_below_the_configured_level_are_dropped(self, log_output: io.StringIO) -> None:
        telemetry.get_logger().debug("noise")
        telemetry.get_logger().info("signal")
        assert [line["event"] for line in _lines(log_output)] == ["signal"]

    def test_an_exception_is_rendered_into_the_line(self, log_output: io.StringIO) -> None:
        try:
            raise RuntimeError("disk vanished")
        except RuntimeError:
            telemetry.get_logger().exception("write failed")
        [line] = _lines(log_output)
        assert "RuntimeError: disk vanished" in line["exception"]
        assert line["level"] == "error"

    def test_standard_library_loggers_write_the_same_json_shape(
        self, log_output: io.StringIO
    ) -> None:
        logging.getLogger("aio_pika.robust_connection").warning("reconnecting in %s s", 5)
        [line] = _lines(log_output)
        assert line["event"] == "reconnecting in 5 s"
        assert line["logger"] == "aio_pika.robust_connection"
        assert line["level"] == "warning"

    def test_a_terminal_gets_readable_lines_instead_of_json(self) -> None:
        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        out = Terminal()
        try:
            configure_logging(stream=out)
            telemetry.get_logger().info("started", policies=3)
        finally:
            structlog.reset_defaults()
            root.handlers[:] = handlers
            root.setLevel(level)
        text = out.getvalue()
        assert "started" in text and "policies" in text
        assert not text.lstrip().startswith("{")

    def test_an_unknown_level_is_refused(self) -> None:
        with pytest.raises(ValueError, match="verbose"):
            configure_logging(level="verbose", stream=io.StringIO())


class TestTraceContextFromAmqp:
    @pytest.mark.parametrize("value", [TRACEPARENT, TRACEPARENT.encode()], ids=["str", "bytes"])
    def test_a_traceparent_header_becomes_the_parent_of_the_next_span(
        self, spans: tuple[TracerProvider, InMemorySpanExporter], value: str | bytes
    ) -> None:
        provider, exporter = spans
        parent = context_from_amqp_headers({"traceparent": value, "x-other": 1})
        with provider.get_tracer("test").start_as_current_span("handle event", context=parent):
            pass
        [span] = exporter.get_finished_spans()
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
        assert span.parent.is_remote

    def test_tracestate_travels_with_the_traceparent(
        self, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        provider, exporter = spans
        parent = context_from_amqp_headers({"Traceparent": TRACEPARENT, "tracestate": b"ven=abc"})
        with provider.get_tracer("test").start_as_current_span("handle event", context=parent):
            pass
        [span] = exporter.get_finished_spans()
        assert span.context.trace_state.get("ven") == "abc"

    @pytest.mark.parametrize("value", [
        "00-zzzz-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        "garbage",
        b"\xff\xfe",
        42,
    ], ids=["not-hex", "zero-trace-id", "garbage", "not-ascii", "not-a-string"])
    def test_a_malformed_traceparent_is_ignored_and_the_span_is_a_root(
        self, spans: tuple[TracerProvider, InMemorySpanExporter], value: object
    ) -> None:
        provider, exporter = spans
        parent = context_from_amqp_headers({"traceparent": value})
        with provider.get_tracer("test").start_as_current_span("handle event", context=parent):
            pass
        [span] = exporter.get_finished_spans()
        assert span.parent is None
        assert format(span.context.trace_id, "032x") != TRACE_ID

    def test_headers_we_publish_carry_the_current_trace(
        self, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        provider, _ = spans
        with provider.get_tracer("test").start_as_current_span("publish") as span:
            headers = trace_headers()
        restored = trace.get_current_span(context_from_amqp_headers(headers)).get_span_context()
        assert restored.trace_id == span.get_span_context().trace_id
        assert restored.span_id == span.get_span_context().span_id


class TestTracingSetup:
    def test_without_endpoint_or_exporter_spans_have_ids_but_no_processor(self) -> None:
        reset_global_tracer_provider()
        provider = configure_tracing(TracingSettings())
        try:
            assert provider._active_span_processor._span_processors == ()
            with provider.get_tracer("test").start_as_current_span("x") as span:
                assert span.get_span_context().is_valid
            assert trace.get_tracer_provider() is provider
        finally:
            provider.shutdown()
            reset_global_tracer_provider()

    def test_an_otlp_endpoint_gets_a_batching_exporter_to_its_traces_url(self) -> None:
        reset_global_tracer_provider()
        provider = configure_tracing(TracingSettings(otlp_endpoint="http://127.0.0.1:4318"))
        try:
            [processor] = provider._active_span_processor._span_processors
            assert isinstance(processor, BatchSpanProcessor)
            exporter = processor._batch_processor._exporter
            assert getattr(exporter, "_endpoint", None) == "http://127.0.0.1:4318/v1/traces"
        finally:
            provider.shutdown()
            reset_global_tracer_provider()

    @pytest.mark.parametrize(("endpoint", "url"), [
        ("http://tempo:4318", "http://tempo:4318/v1/traces"),
        ("http://tempo:4318/", "http://tempo:4318/v1/traces"),
        ("https://otel.example/custom/traces", "https://otel.example/custom/traces"),
    ])
    def test_a_bare_collector_address_gets_the_standard_traces_path(
        self, endpoint: str, url: str
    ) -> None:
        assert otlp_traces_url(endpoint) == url


def test_the_log_level_changes_in_a_running_process(log_output: io.StringIO) -> None:
    logger = telemetry.get_logger(component="test")  # bound before the change, follows it
    logger.debug("hidden")
    assert set_log_level("debug") is True
    assert set_log_level("debug") is False  # already there
    logger.debug("shown")
    assert set_log_level("error") is True
    logger.warning("hidden too")
    logger.error("shown too")
    assert [line["event"] for line in _lines(log_output)] == ["shown", "shown too"]
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        set_log_level("loud")


class TestStateTransitionLog:
    def test_a_failure_is_logged_once_and_the_recovery_once(self) -> None:
        with structlog.testing.capture_logs() as events:
            transitions = StateTransitionLog()
            logged = [transitions.failed("amqp", "amqp connection failed", error="refused")
                      for _ in range(3)]
            recovered = [transitions.ok("amqp", "amqp connection recovered") for _ in range(2)]
        visible = [e for e in events if e["log_level"] != "debug"]
        assert logged == [True, False, False]
        assert recovered == [True, False]
        assert [(e["log_level"], e["event"]) for e in visible] == [
            ("error", "amqp connection failed"), ("info", "amqp connection recovered")]
        assert visible[0]["error"] == "refused"
        assert visible[1]["attempts"] == 3 and visible[1]["recovered"] is True

    def test_a_new_failure_after_recovery_is_logged_again(self) -> None:
        with structlog.testing.capture_logs() as events:
            transitions = StateTransitionLog()
            transitions.failed("libvirt", "libvirt connection lost")
            transitions.ok("libvirt", "libvirt connection recovered")
            transitions.failed("libvirt", "libvirt connection lost")
        assert [e["log_level"] for e in events] == ["error", "info", "error"]
        assert transitions.is_failing("libvirt")

    def test_keys_are_independent(self) -> None:
        with structlog.testing.capture_logs() as events:
            transitions = StateTransitionLog()
            transitions.failed("libvirt", "libvirt down")
            transitions.failed("amqp", "amqp down")
            transitions.ok("amqp", "amqp recovered")
        assert [e["event"] for e in events] == ["libvirt down", "amqp down", "amqp recovered"]
        assert transitions.is_failing("libvirt") and not transitions.is_failing("amqp")

    def test_success_without_a_prior_failure_logs_nothing(self) -> None:
        with structlog.testing.capture_logs() as events:
            assert StateTransitionLog().ok("s3", "s3 recovered") is False
        assert events == []


def test_lines_to_the_journal_carry_their_syslog_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        try:
            configure_logging(json=True, level="info", stream=stream)
            telemetry.get_logger().error("volume write failed")
            telemetry.get_logger().info("image cached")
        finally:
            structlog.reset_defaults()
            root.handlers[:] = handlers
            root.setLevel(level)
    first, second = path.read_text().splitlines()
    assert first.startswith("<3>{") and json.loads(first[3:])["event"] == "volume write failed"
    assert second.startswith("<6>{")


def test_lines_elsewhere_are_plain_json(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # some other stream
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    path = tmp_path / "log"
    with open(path, "w") as stream:
        try:
            configure_logging(json=True, level="info", stream=stream)
            telemetry.get_logger().error("volume write failed")
        finally:
            structlog.reset_defaults()
            root.handlers[:] = handlers
            root.setLevel(level)
    assert json.loads(path.read_text())["event"] == "volume write failed"
