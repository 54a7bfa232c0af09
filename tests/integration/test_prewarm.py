"""Pre-warming end to end: real S3, real RabbitMQ, real qemu-img, the real daemon.

Each test uploads objects to its own bucket, publishes notifications exactly as MinIO
does to its own exchange, and watches the cache directory and the metrics.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.harness import Env
from testsupport.daemon import DaemonProcess, RunningDaemon, running_daemon
from testsupport.metrics import (
    RECEIVED,
    messages_handled,
    metric_async,
    metric_grows,
    metric_now,
)
from testsupport.polling import wait_for
from testsupport.proxy import Proxy, address_of
from testsupport.services import (
    AMQP_URL,
    make_qcow2,
    minio_event,
    publish,
    publish_many,
    queue_messages,
    ready_count,
    sha256_file,
)
from watcher.config import load_config

pytestmark = pytest.mark.integration


@pytest.fixture
async def daemon(env: Env) -> AsyncIterator[RunningDaemon]:
    """The daemon, in this test's loop, without libvirt (pre-warming needs none), past its
    start-up reconcile (quick: the tests upload their images later), so that only their
    own events warm."""
    async with running_daemon(env.config_path) as running:
        await wait_for(lambda: running.daemon.reconciles >= 1 or running.task.done(),
                       what="the start-up reconcile")
        yield running
    assert running.exit_code == 0


DOWNLOADS = "volume_watcher_downloads_total"
CACHE_HITS = "volume_watcher_cache_hits_total"
REJECTED = "volume_watcher_images_rejected_total"
PUT = {"source": "amqp", "type": "s3:ObjectCreated:Put"}


def image_policy(env: Env, key: str, **extra: object) -> None:
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2", **extra}},
                     [{"match": "*", "image": "base"}])


# Policies must exist before the daemon starts; each test writes them first.
@pytest.fixture
def base_policy(env: Env) -> str:
    key = "images/base image.qcow2"  # a space: URL-encoded as '+' in the event
    image_policy(env, key)
    return key


async def test_uploaded_image_appears_verified_in_the_cache(
        env: Env, base_policy: str, tmp_path: Path, daemon: RunningDaemon) -> None:
    image = make_qcow2(tmp_path / "v1.qcow2", extra=["-c"])
    digest = env.upload_with_sidecar(base_policy, image)
    await publish(env.exchange, minio_event(env.bucket, base_policy))

    await wait_for(lambda: digest in daemon.entries(), what="cache entry")
    entry = daemon.daemon.cache.get(digest)
    assert entry is not None
    assert sha256_file(entry.path) == digest
    assert entry.format == "qcow2" and entry.virtual_size == 16 * 1024 * 1024
    assert entry.size == image.stat().st_size  # kept compressed, as uploaded
    record = json.loads(entry.path.with_suffix(".json").read_text())
    assert record["bucket"] == env.bucket and record["key"] == base_policy and record["etag"]
    assert daemon.daemon.cache.current("base") == daemon.daemon.cache.get(digest)


async def test_sidecar_arriving_after_the_image_triggers_one_download(
        env: Env, base_policy: str, tmp_path: Path, daemon: RunningDaemon) -> None:
    image = make_qcow2(tmp_path / "v1.qcow2")
    env.upload_file(base_policy, image)
    before = await metric_async(daemon, DOWNLOADS, result="ok")
    received = await metric_async(daemon, RECEIVED, source="amqp")
    await publish(env.exchange, minio_event(env.bucket, base_policy))
    await messages_handled(daemon, received, 1)
    assert daemon.entries() == []

    digest = sha256_file(image)
    env.upload(base_policy + ".sha256", f"{digest}\n".encode())
    await publish(env.exchange, minio_event(env.bucket, base_policy + ".sha256"))
    await wait_for(lambda: digest in daemon.entries(), what="cache entry")

    # Duplicates and redeliveries: no second download.
    received = await metric_async(daemon, RECEIVED, source="amqp")
    for _ in range(3):
        await publish(env.exchange, minio_event(env.bucket, base_policy))
    await messages_handled(daemon, received, 3)
    assert await metric_async(daemon, DOWNLOADS, result="ok") - before == 1


async def test_a_burst_of_duplicates_shares_a_few_lookups_and_every_message_is_acked(
        env: Env, base_policy: str, tmp_path: Path) -> None:
    digest = env.upload_with_sidecar(base_policy, make_qcow2(tmp_path / "v1.qcow2"))
    async with running_daemon(env.config_path) as first:  # declares the queue, warms
        await wait_for(lambda: digest in first.entries(), what="cache entry")
    assert first.exit_code == 0

    # Queued while no daemon runs, so they arrive as fast as the broker can send them.
    await publish_many(env.exchange, [minio_event(env.bucket, base_policy)] * 200)
    await publish_many(env.exchange, [minio_event(env.bucket, "elsewhere/other.qcow2")] * 300)
    hits_before = metric_now(CACHE_HITS)
    received_before = metric_now(RECEIVED, **PUT)
    async with running_daemon(env.config_path) as second:
        async def all_received() -> bool:
            return await metric_async(second, RECEIVED, **PUT) - received_before == 500

        await wait_for(all_received, what="every notification")
        await wait_for(lambda: second.daemon.consumer.messages_in_flight == 0,
                       what="handlers done")
    # Stopping closed the channel: anything unacked is queued again.
    assert second.exit_code == 0

    # One lookup (a HEAD and a sidecar GET) per run, the start-up reconcile's included.
    # Runs for one image never overlap, and every request during a run shares the next.
    hits = metric_now(CACHE_HITS) - hits_before
    assert 1 <= hits <= 10, f"{hits} lookups for 200 duplicates"
    queue = load_config(env.config_path).amqp.queue_name()
    assert await ready_count(queue) == 0
    assert await ready_count(f"{queue}.dead") == 0


async def test_checksum_mismatch_is_not_cached_and_is_reported(
        env: Env, base_policy: str, tmp_path: Path, daemon: RunningDaemon,
        capsys: pytest.CaptureFixture[str]) -> None:
    image = make_qcow2(tmp_path / "v1.qcow2")
    env.upload_file(base_policy, image)
    env.upload(base_policy + ".sha256", b"0" * 64 + b"\n")
    before = await metric_async(daemon, REJECTED, reason="checksum_mismatch")
    await publish(env.exchange, minio_event(env.bucket, base_policy))
    await metric_grows(daemon, REJECTED, before, 1, reason="checksum_mismatch")
    assert daemon.entries() == []
    assert not list((env.cache_dir / "objects").iterdir())
    # The consumer carries on: a fixed sidecar is picked up without a second download.
    downloads = await metric_async(daemon, DOWNLOADS, result="ok")
    env.upload(base_policy + ".sha256", f"{sha256_file(image)}\n".encode())
    await publish(env.exchange, minio_event(env.bucket, base_policy + ".sha256"))
    await wait_for(lambda: daemon.entries(), what="cache entry after the sidecar was fixed")
    assert await metric_async(daemon, DOWNLOADS, result="ok") == downloads


@pytest.mark.parametrize("hostile", ["backing_file", "data_file", "raw_posing"])
async def test_hostile_images_are_rejected_and_never_cached(
        env: Env, tmp_path: Path, hostile: str) -> None:
    key = f"images/{hostile}.qcow2"
    base = make_qcow2(tmp_path / "base.qcow2")
    bad = tmp_path / "bad.qcow2"
    declared = "qcow2"
    if hostile == "backing_file":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                        str(bad)], check=True)
    elif hostile == "data_file":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"data_file={tmp_path / 'data.raw'}", str(bad), "16M"], check=True)
    else:
        bad = base  # a qcow2 declared raw
        declared = "raw"
    env.write_policy({"bad": {"bucket": env.bucket, "key": key, "format": declared}},
                     [{"match": "*", "image": "bad"}])
    env.upload_with_sidecar(key, bad)
    reason = {"raw_posing": "format_mismatch"}.get(hostile, hostile)
    before = metric_now(REJECTED, reason=reason)
    async with running_daemon(env.config_path) as running:
        await publish(env.exchange, minio_event(env.bucket, key))
        await metric_grows(running, REJECTED, before, 1, reason=reason)
        assert running.daemon.cache.entries() == []
        assert not [p for p in (env.cache_dir / "tmp").iterdir() if p.suffix == ".part"]


async def test_malformed_message_is_dead_lettered_and_the_next_event_is_handled(
        env: Env, base_policy: str, tmp_path: Path, daemon: RunningDaemon) -> None:
    await publish(env.exchange, b"{not json")
    await publish(env.exchange, b'{"Records": [{"s3": {}}]}')
    image = make_qcow2(tmp_path / "v1.qcow2")
    digest = env.upload_with_sidecar(base_policy, image)
    await publish(env.exchange, minio_event(env.bucket, base_policy))
    await wait_for(lambda: digest in daemon.entries(), what="cache entry")
    bodies = await queue_messages(f"{env.queue}.dead")
    assert bodies == [b"{not json", b'{"Records": [{"s3": {}}]}']


async def test_event_published_after_a_broker_outage_is_handled(
        env: Env, base_policy: str, tmp_path: Path, proxy_to: Callable[..., Proxy]) -> None:
    # The outage is the daemon's own: its connection goes through a relay that refuses
    # it for a while; everyone else on the shared broker carries on.
    proxy = proxy_to(address_of(AMQP_URL))
    env.write_config(amqp={"url": proxy.url(AMQP_URL)})
    async with running_daemon(env.config_path) as daemon:
        image = make_qcow2(tmp_path / "v1.qcow2")
        digest = env.upload_with_sidecar(base_policy, image)
        with proxy.outage():
            await wait_for(lambda: not daemon.daemon.consumer.consuming,
                           what="consumer to notice")
        await wait_for(lambda: daemon.daemon.consumer.consuming, timeout=60, what="reconnect")
        await publish(env.exchange, minio_event(env.bucket, base_policy))
        await wait_for(lambda: digest in daemon.entries(), what="cache entry after restart")
    assert daemon.exit_code == 0


async def test_eviction_keeps_the_current_version_of_policy_images(
        env: Env, tmp_path: Path) -> None:
    pinned_key, other_key = "images/pinned.qcow2", "images/other.qcow2"
    env.write_policy({"pinned": {"bucket": env.bucket, "key": pinned_key, "format": "qcow2"},
                      "other": {"bucket": env.bucket, "key": other_key, "format": "qcow2"}},
                     [{"match": "*", "image": "pinned"}])
    pinned = env.upload_with_sidecar(pinned_key, make_qcow2(tmp_path / "p.qcow2", seed=1))
    old_other = env.upload_with_sidecar(other_key, make_qcow2(tmp_path / "o1.qcow2", seed=2))
    # Room for about two entries only.
    size = (tmp_path / "p.qcow2").stat().st_size
    env.write_config(cache={"max_size": int(size * 2.5)})
    async with running_daemon(env.config_path) as running:
        await wait_for(lambda: {pinned, old_other} <= set(running.entries()),
                       what="initial reconcile")
        new_other = env.upload_with_sidecar(other_key, make_qcow2(tmp_path / "o2.qcow2", seed=3))
        await publish(env.exchange, minio_event(env.bucket, other_key))
        # Eviction runs just after the commit that made room necessary: wait for both.
        await wait_for(lambda: new_other in running.entries()
                       and old_other not in running.entries(),
                       what=lambda: f"new version cached, old evicted; {set(running.entries())}")
        digests = set(running.entries())
        assert pinned in digests and new_other in digests and old_other not in digests


def test_kill_during_download_leaves_no_partial_entry(env: Env, tmp_path: Path) -> None:
    key = "images/big.qcow2"
    # A large uncompressible image so the download is still running when we kill.
    image = make_qcow2(tmp_path / "big.qcow2", size="512M", fill_mib=400)
    digest = env.upload_with_sidecar(key, image)
    image_policy(env, key)
    tmp = env.cache_dir / "tmp"
    proc = DaemonProcess(env.config_path).start()
    try:
        proc.wait(lambda: tmp.exists() and any(p.suffix == ".part" for p in tmp.iterdir()),
                  60, "download to start")
        proc.kill()
        assert not list((env.cache_dir / "objects").glob("*.json"))

        proc.start()
        objects = env.cache_dir / "objects"
        proc.wait(lambda: (objects / f"{digest}.json").exists(), 120, "entry after restart")
        assert sha256_file(objects / f"{digest}.qcow2") == digest
        assert not [p for p in tmp.iterdir() if p.suffix == ".part"]
    finally:
        proc.stop(30)


async def test_an_event_traced_upstream_parents_the_warm_download_and_inspect_spans(
        env: Env, base_policy: str, tmp_path: Path,
        spans: tuple[TracerProvider, InMemorySpanExporter], daemon: RunningDaemon) -> None:
    _provider, exporter = spans
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    digest = env.upload_with_sidecar(base_policy, make_qcow2(tmp_path / "v1.qcow2"))
    await publish(env.exchange, minio_event(env.bucket, base_policy),
                  headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    await wait_for(lambda: digest in daemon.entries(), what="cache entry")

    def in_trace() -> dict[str, ReadableSpan]:
        return {s.name: s for s in exporter.get_finished_spans()
                if s.context.trace_id == int(trace_id, 16)}

    # The entry is visible before the spans around its download end (a moment later).
    wanted = {"bucket event", "warm", "download", "inspect"}
    await wait_for(lambda: wanted <= set(in_trace()),
                   what=lambda: f"spans {wanted}; finished {set(in_trace())}")
    finished = in_trace()
    event, warm = finished["bucket event"], finished["warm"]
    assert event.parent is not None and event.parent.span_id == int(parent_id, 16)
    assert warm.parent is not None and warm.parent.span_id == event.context.span_id
    for child in ("download", "inspect"):
        parent = finished[child].parent
        assert parent is not None and parent.span_id == warm.context.span_id
    attributes = finished["inspect"].attributes
    assert attributes is not None and attributes["digest"] == digest
