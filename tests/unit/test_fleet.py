"""Fleet decisions by tables: the download spread, ``hosts:`` scoping, status documents,
staleness and the hosts x images table, plus the fleet's config keys and policy fields."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path
from textwrap import dedent

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import reset_global_tracer_provider
from watcher.config import load_config
from watcher.core.errors import ConfigError
from watcher.core.fleet import (
    fleet_view,
    host_matches,
    is_stale,
    parse_status,
    spread_delay,
    status_document,
    status_key,
    view_json,
    view_lines,
)
from watcher.core.policy import PolicySet
from watcher.core.policy_load import parse_policies
from watcher.fleet import FleetMember
from watcher.runtime.observability import configure_tracing
from watcher.settings import (
    FLEET_TUNING,
    Config,
    FleetSettings,
    HostSettings,
    TracingSettings,
)

MIN_WRITE_INTERVAL = FLEET_TUNING.min_write_interval

NOW = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


# --- the spread ----------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "version", "spread"), [
    ("hv-01", "vm-images/u.qcow2@etag1", 10.0),
    ("hv-02", "vm-images/u.qcow2@etag1", 10.0),
    ("hv-01", "vm-images/u.qcow2@etag2", 0.5),
    ("a-very-long-host-name.example.org", "b/k@e", 3600.0),
])
def test_the_spread_delay_is_fixed_per_host_and_version_and_inside_the_window(
        host: str, version: str, spread: float) -> None:
    delay = spread_delay(host, version, spread)
    assert 0 <= delay < spread
    assert spread_delay(host, version, spread) == delay


@pytest.mark.parametrize("spread", [0.0, -1.0])
def test_no_spread_means_no_wait(spread: float) -> None:
    assert spread_delay("hv-01", "b/k@e", spread) == 0.0


def test_hosts_get_different_delays_spread_over_the_window() -> None:
    delays = [spread_delay(f"hv-{i:03d}", "vm-images/u.qcow2@e1", 10.0) for i in range(200)]
    assert len(set(delays)) == 200
    assert 4.0 < statistics.mean(delays) < 6.0  # uniform over [0, 10)
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(10)]
    assert max(per_second) < 40  # 20 expected; none gets a crowd


def test_a_new_version_moves_a_host_to_another_place_in_the_window() -> None:
    hosts = [f"hv-{i:02d}" for i in range(20)]
    first = [spread_delay(h, "b/k@v1", 10.0) for h in hosts]
    second = [spread_delay(h, "b/k@v2", 10.0) for h in hosts]
    assert first != second


# --- hosts: globs --------------------------------------------------------------------------


@pytest.mark.parametrize(("globs", "host", "expected"), [
    ((), "hv-01", True),
    (("hv-*",), "hv-01", True),
    (("hv-*",), "db-01", False),
    (("db-*", "hv-0[1-3]"), "hv-02", True),
    (("db-*", "hv-0[1-3]"), "hv-04", False),
    (("HV-*",), "hv-01", False),  # case matters, as in host names in the bucket
])
def test_host_globs(globs: tuple[str, ...], host: str, expected: bool) -> None:
    assert host_matches(globs, host) is expected


POLICY = dedent("""\
    images:
      everywhere: {bucket: b, key: e.qcow2, format: qcow2}
      hv-only: {bucket: b, key: h.qcow2, format: qcow2, hosts: ["hv-*"]}
    domains:
      - {match: "web-*", image: hv-only, hosts: ["hv-*"]}
      - {match: "*", image: everywhere}
    """)


@pytest.mark.parametrize(("host", "warm", "rule_image", "event_images"), [
    ("hv-01", ["everywhere", "hv-only"], "hv-only", ["hv-only"]),
    ("db-01", ["everywhere"], "everywhere", []),
])
def test_hosts_decide_which_images_are_warmed_and_which_rule_matches(
        host: str, warm: list[str], rule_image: str, event_images: list[str]) -> None:
    policies = parse_policies([("p.yaml", POLICY)]).on_host(host)
    assert [i.name for i in policies.images_to_keep_warm()] == warm
    rule = policies.rule_for("web-1")
    assert rule is not None and rule.image == rule_image
    assert [i.name for i in policies.images_for_object("b", "h.qcow2")] == event_images
    assert set(policies.images) == {"everywhere", "hv-only"}  # a reprovision may still fetch it


def test_policies_without_a_host_apply_everywhere() -> None:
    policies = parse_policies([("p.yaml", POLICY)])
    assert len(policies.images_to_keep_warm()) == 2
    rule = policies.rule_for("web-1")
    assert rule is not None and rule.image == "hv-only"


@pytest.mark.parametrize(("snippet", "line", "words"), [
    ("      x: {bucket: b, key: k, format: qcow2, hosts: hv-*}\n", 4, "expected a list"),
    ("      x: {bucket: b, key: k, format: qcow2, hosts: []}\n", 4, "matches no host"),
    ("      x: {bucket: b, key: k, format: qcow2, hosts: [1]}\n", 4, "non-empty string"),
])
def test_bad_hosts_are_reported_at_their_line(snippet: str, line: int, words: str) -> None:
    text = "images:\n  a: {bucket: b, key: a, format: qcow2}\n" + snippet.replace("      ", "  ")
    text = "\n" + text  # the image under test is on line 4
    with pytest.raises(ConfigError) as caught:
        parse_policies([("p.yaml", text)])
    [problem] = caught.value.problems
    assert (problem.line, words in problem.message) == (line, True), problem


def test_a_rule_with_bad_hosts_is_reported_at_its_line() -> None:
    text = "images:\n  a: {bucket: b, key: a, format: qcow2}\ndomains:\n" \
           "  - match: x\n    image: a\n    hosts: {hv: 1}\n"
    with pytest.raises(ConfigError) as caught:
        parse_policies([("p.yaml", text)])
    assert [(p.line, "domains[0].hosts" in p.message) for p in caught.value.problems] == \
        [(6, True)]


# --- status documents, staleness, the table ---------------------------------------------


def doc(host: str, age: float, interval: float = 60.0, **kw: object) -> dict[str, object]:
    fields: dict[str, object] = {"cached": {}, "warming": (), "failed": {}, "outdated": ()}
    fields.update(kw)
    return status_document(host=host, version="0.1.0", updated_at=NOW - timedelta(seconds=age),
                           reconcile_interval=interval, **fields)  # type: ignore[arg-type]


def test_a_status_document_has_the_contract_fields_and_reads_back() -> None:
    written = doc("hv-01", 0, cached={"u": DIGEST_A}, warming=["d"], failed={"w": "format"},
                  outdated=["web-2", "web-1"])
    assert written == {
        "format": 1, "host": "hv-01", "version": "0.1.0", "updated_at": NOW.isoformat(),
        "reconcile_interval": 60.0, "images": {"u": DIGEST_A}, "warming": ["d"],
        "failed": {"w": "format"}, "outdated_domains": ["web-1", "web-2"]}
    assert parse_status(written) == written
    assert status_key("hv-01") == ".libvirt-volume-watcher/hosts/hv-01.json"


@pytest.mark.parametrize("bad", [
    None, [], {"host": "../x", "updated_at": NOW.isoformat(), "reconcile_interval": 1},
    {"host": "hv", "updated_at": "yesterday", "reconcile_interval": 1},
    {"host": "hv", "updated_at": NOW.isoformat()},
    {"host": "hv", "updated_at": NOW.isoformat(), "reconcile_interval": 1, "images": []},
])
def test_what_is_not_a_status_document_is_skipped(bad: object) -> None:
    assert parse_status(bad) is None


@pytest.mark.parametrize(("age", "interval", "stale"), [
    (0, 60, False), (179, 60, False), (181, 60, True), (31, 10, True), (3599, 1200, False),
])
def test_a_host_is_stale_after_three_of_its_reconcile_intervals(
        age: float, interval: float, stale: bool) -> None:
    assert is_stale(doc("hv-01", age, interval), NOW) is stale


def test_the_table_shows_every_host_and_image_and_marks_stale_hosts() -> None:
    view = fleet_view([
        doc("hv-02", 5, cached={"u": DIGEST_A}, warming=["d"]),
        doc("hv-01", 5, cached={"u": DIGEST_A, "d": DIGEST_B}, outdated=["web-1"]),
        doc("hv-03", 999, failed={"u": "checksum_mismatch"}),
    ], NOW)
    assert view.images == ("d", "u")
    assert [(r.host, r.stale) for r in view.rows] == [
        ("hv-01", False), ("hv-02", False), ("hv-03", True)]
    assert view.rows[1].cells == {"u": DIGEST_A, "d": "warming"}
    lines = view_lines(view)
    assert lines[0].split() == ["HOST", "STATE", "d", "u", "OUTDATED"]
    assert lines[1].split() == ["hv-01", "ok", DIGEST_B[:12], DIGEST_A[:12], "web-1"]
    assert lines[2].split() == ["hv-02", "ok", "warming", DIGEST_A[:12], "-"]
    assert lines[3].split() == ["hv-03", "STALE", "-", "failed:", "checksum_mismatch", "-"]
    as_json = view_json(view)
    assert as_json["images"] == ["d", "u"]
    assert as_json["hosts"][2] == {"host": "hv-03", "stale": True, "age_seconds": 999.0,
                                   "version": "0.1.0",
                                   "images": {"u": "failed: checksum_mismatch"},
                                   "outdated_domains": []}


# --- config keys ---------------------------------------------------------------------------


def test_fleet_settings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("host: {name: hv-07}\nfleet: {status_bucket: fleet-status}\n"
                    "prewarm: {spread: 30}\namqp: {queue_type: quorum, delivery_limit: 3}\n")
    config = load_config(path, environ={})
    assert (config.host.resolved, config.fleet.status_bucket, config.prewarm.spread) == \
        ("hv-07", "fleet-status", 30.0)
    assert (config.amqp.queue_type, config.amqp.delivery_limit) == ("quorum", 3)
    assert config.amqp.queue_name(config.host.resolved) == "libvirt-volume-watcher.hv-07"


def test_fleet_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("prewarm: {spread: 0}\nhost: {name: ''}\n")
    config = load_config(path, environ={})
    assert (config.prewarm.spread, config.fleet.status_bucket, config.amqp.queue_type) == \
        (0.0, "", "classic")
    assert config.host.name == "" and config.host.resolved  # the machine's hostname


@pytest.mark.parametrize(("text", "line", "words"), [
    ("host:\n  name: hv/01\n", 2, "host.name: expected letters"),
    ("fleet:\n  status_bucket: Not_A_Bucket\n", 2, "fleet.status_bucket: expected an S3"),
    ("prewarm:\n  spread: -5\n", 2, "prewarm.spread: expected a number larger than 0"),
    ("prewarm:\n  spread: soon\n", 2, "prewarm.spread"),
    ("amqp:\n  queue_type: stream\n", 2, "amqp.queue_type"),
    ("amqp:\n  delivery_limit: 0\n", 2, "amqp.delivery_limit"),
    ("fleet:\n  bucket: x\n", 2, "fleet: unknown key 'bucket'"),
])
def test_bad_fleet_settings_are_reported_at_their_line(
        tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == (str(path), line)
    assert words in problem.message, problem.message


# --- this host's status writer and trace resource ----------------------------------------


class _RecordingStore:
    """Stands in for the bucket; ``write`` runs in the writer's executor thread."""

    bucket = "fleet-status"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.writes: list[dict[str, object]] = []
        self.wrote = asyncio.Event()
        self._loop = loop

    def write(self, document: dict[str, object]) -> None:
        self.writes.append(document)
        self._loop.call_soon_threadsafe(self.wrote.set)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.writes) < count:
                self.wrote.clear()
                await self.wrote.wait()


class _NoCache:
    def current(self, name: str) -> None:
        return None


async def test_status_writes_are_debounced_and_a_reconcile_always_writes() -> None:
    stop = asyncio.Event()
    config = Config(host=HostSettings(name="hv-01"), fleet=FleetSettings(status_bucket="s"))
    member = FleetMember(config, _NoCache(), PolicySet, stop)  # type: ignore[arg-type]
    store = _RecordingStore(asyncio.get_running_loop())
    member._store = store  # type: ignore[assignment]
    writer = asyncio.create_task(member.run())
    try:
        member.reconciled(["web-1"])
        await store.until(1)
        for attempt in range(30):  # a burst of changes within the second shares one write
            member.failed["u"] = f"reason-{attempt}"
            member.changed()
            await asyncio.sleep(0.01)
        await store.until(2)
        member.reconciled(None)  # a reconcile writes, also when nothing changed
        await store.until(3)
        assert [w["failed"] for w in store.writes] == [{}, {"u": "reason-29"}, {"u": "reason-29"}]
        assert [w["outdated_domains"] for w in store.writes] == [["web-1"]] * 3
        times = [datetime.fromisoformat(str(w["updated_at"])) for w in store.writes]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert min(gaps) >= MIN_WRITE_INTERVAL - 0.05, gaps
    finally:
        stop.set()
        await writer


def test_the_trace_resource_names_the_host() -> None:
    reset_global_tracer_provider()
    provider = configure_tracing(TracingSettings(), exporter=InMemorySpanExporter(),
                                 host_name="hv-01")
    try:
        assert provider.resource.attributes["host.name"] == "hv-01"
    finally:
        provider.shutdown()
        reset_global_tracer_provider()
