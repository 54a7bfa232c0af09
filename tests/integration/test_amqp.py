"""The bucket-event consumer against the real RabbitMQ: nothing is lost or stuck.

Each test gets its own exchange and queue names and deletes them (with the dead-letter
pair) afterwards, since other test runs share the broker. Outages are the consumer's
own: it connects through a relay (``testsupport.proxy``) that cuts its connection.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest

from testsupport.polling import wait_for
from testsupport.proxy import Proxy, address_of
from testsupport.services import delete_amqp, publish_many, ready_count
from watcher.adapters.amqp import BucketEventConsumer
from watcher.core.errors import MalformedEvent, PermanentError, TemporaryError
from watcher.settings import AmqpSettings

pytestmark = pytest.mark.integration

WAIT = 10.0
"""Seconds any single expectation may take before the test fails."""


class RecordingLog:
    """Keeps every log call so tests can read what an operator would see."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.records.append(("info", event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append(("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.records.append(("error", event, fields))

    def events(self, level: str) -> list[tuple[str, dict[str, Any]]]:
        return [(event, fields) for lvl, event, fields in self.records if lvl == level]


@dataclass(frozen=True)
class Broker:
    """What a test needs to talk to RabbitMQ on its own, beside the consumer."""

    url: str
    exchange: str
    queue: str

    @property
    def settings(self) -> AmqpSettings:
        return AmqpSettings(url=self.url, exchange=self.exchange, exchange_type="fanout",
                            routing_key="", queue=self.queue, prefetch=8)

    async def publish(self, body: bytes, *, message_id: str | None = None) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(self.exchange)
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 message_id=message_id),
                routing_key="",
            )

    async def publish_many(self, bodies: list[bytes]) -> None:
        await publish_many(self.exchange, bodies, url=self.url)

    async def ready_count(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting ones delivered but unacked)."""
        return await ready_count(queue, url=self.url)

    async def take(self, queue: str) -> tuple[bytes, bool]:
        """Remove one message from ``queue``, waiting for it; returns (body, redelivered)."""
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            message = await wait_for(lambda: declared.get(no_ack=True, fail=False), WAIT,
                                     what=f"a message in {queue}")
            return message.body, bool(message.redelivered)


@pytest.fixture
async def broker(services_env: dict[str, str], unique_name: str) -> AsyncIterator[Broker]:
    broker = Broker(url=services_env["LVW_AMQP_URL"], exchange=f"lvw-test-events-{unique_name}",
                    queue=f"lvw-test-{unique_name}")
    yield broker
    # A fresh connection: the test may have cut the old ones.
    await delete_amqp(broker.exchange, broker.queue, url=broker.url)


Handler = Callable[[bytes, Mapping[str, object]], Awaitable[None] | None]


@asynccontextmanager
async def running(broker: Broker, handler: Handler, log: RecordingLog | None = None,
                  ) -> AsyncIterator[BucketEventConsumer]:
    consumer = BucketEventConsumer(broker.settings, handler, queue_name=broker.queue,
                                   log=log or RecordingLog(), reconnect_interval=0.3)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop(drain_timeout=1.0)


class Recorder:
    """A handler that remembers bodies; bodies listed in ``fail_with`` raise instead."""

    def __init__(self, fail_with: Mapping[bytes, Exception] | None = None) -> None:
        self.handled: list[bytes] = []
        self.fail_with = dict(fail_with or {})

    async def __call__(self, body: bytes, headers: Mapping[str, object]) -> None:
        if body in self.fail_with:
            raise self.fail_with[body]
        self.handled.append(body)


# -- the ordinary path ---------------------------------------------------------------


async def test_a_message_is_handed_to_the_handler_and_acked(broker: Broker) -> None:
    recorder = Recorder()
    async with running(broker, recorder) as consumer:
        assert consumer.connected and consumer.consuming
        assert consumer.last_message_at is None
        await broker.publish(b'{"Records": []}')
        await wait_for(lambda: recorder.handled == [b'{"Records": []}'], WAIT,
                       what="the message is handled")
        await wait_for(lambda: consumer.messages_in_flight == 0, WAIT,
                       what="the handler task finishes")
        assert consumer.last_message_at is not None
    assert not consumer.consuming
    # The consumer is closed: an unacked message would be back in the queue by now.
    assert await broker.ready_count(broker.queue) == 0
    assert await broker.ready_count(f"{broker.queue}.dead") == 0


async def test_a_malformed_event_is_dead_lettered_and_the_next_message_still_handled(
    broker: Broker,
) -> None:
    log = RecordingLog()
    bad_body = b"not json " + b"x" * 300
    recorder = Recorder(fail_with={bad_body: MalformedEvent("body is not JSON")})
    async with running(broker, recorder, log):
        await broker.publish(bad_body, message_id="bad-1")
        await broker.publish(b"good")
        await wait_for(lambda: recorder.handled == [b"good"], WAIT,
                       what="the good message is handled")

    body, _ = await broker.take(f"{broker.queue}.dead")
    assert body == bad_body
    assert await broker.ready_count(broker.queue) == 0
    [(event, fields)] = log.events("error")
    assert event == "amqp message dead-lettered"
    assert fields["reason"] == "malformed"
    assert fields["message_id"] == "bad-1"
    assert fields["delivery_tag"] is not None
    assert fields["body"] == bad_body[:200].decode()


async def test_temporary_and_unexpected_failures_are_dead_lettered_too(broker: Broker) -> None:
    log = RecordingLog()
    recorder = Recorder(fail_with={b"slow s3": TemporaryError("S3 timed out"),
                                   b"bug": KeyError("oops")})
    async with running(broker, recorder, log) as consumer:
        await broker.publish(b"slow s3")
        await broker.publish(b"bug")
        await wait_for(lambda: len(log.events("error")) == 2, WAIT, what="both failures are logged")
        await wait_for(lambda: consumer.messages_in_flight == 0, WAIT, what="both are settled")

    dead = {(await broker.take(f"{broker.queue}.dead"))[0] for _ in range(2)}
    assert dead == {b"slow s3", b"bug"}
    assert sorted(fields["reason"] for _, fields in log.events("error")) == [
        "temporary", "unexpected"]


async def test_messages_are_handled_concurrently(broker: Broker) -> None:
    second_handled = asyncio.Event()
    order: list[bytes] = []

    async def handler(body: bytes, headers: Mapping[str, object]) -> None:
        if body == b"first":
            # Blocks until the second message was handled: proves they overlap.
            await asyncio.wait_for(second_handled.wait(), WAIT)
        else:
            second_handled.set()
        order.append(body)

    async with running(broker, handler):
        await broker.publish(b"first")
        await broker.publish(b"second")
        await wait_for(lambda: len(order) == 2, WAIT, what="both messages are handled")
    assert order == [b"second", b"first"]


async def test_batched_acks_settle_every_message_once_around_failures_and_a_slow_one(
    broker: Broker,
) -> None:
    """Prefetch is 8: 300 messages get through only if acks keep flowing past a handler
    that is still running, and rejected ones are never swept up by a multiple-ack."""
    release_slow = asyncio.Event()
    handled: list[bytes] = []
    failing = {f"m{i}".encode() for i in range(0, 300, 7)}

    async def finish_slowly() -> None:
        # Its own generous limit: it must outlast publishing and handling the 300 others.
        await asyncio.wait_for(release_slow.wait(), 6 * WAIT)
        handled.append(b"slow")

    def handler(body: bytes, headers: Mapping[str, object]) -> Awaitable[None] | None:
        if body == b"slow":
            return finish_slowly()
        if body in failing:
            raise MalformedEvent(f"{body!r} is broken")
        handled.append(body)
        return None  # done without a task: acked with the next batch

    async with running(broker, handler) as consumer:
        await broker.publish(b"slow")
        await wait_for(lambda: consumer.messages_in_flight == 1, WAIT,
                       what="the slow one is running")
        await broker.publish_many([f"m{i}".encode() for i in range(300)])
        await wait_for(lambda: len(handled) == 300 - len(failing), 4 * WAIT,
                       what="every other message is handled while the slow one runs")
        release_slow.set()
        await wait_for(lambda: b"slow" in handled, WAIT, what="the slow one finishes")

    assert await broker.ready_count(broker.queue) == 0
    assert await broker.ready_count(f"{broker.queue}.dead") == len(failing)
    assert sorted(handled) == sorted([b"slow"] + [f"m{i}".encode() for i in range(300)
                                                 if f"m{i}".encode() not in failing])


async def test_messages_published_while_the_daemon_is_stopped_are_handled_after_start(
    broker: Broker,
) -> None:
    recorder = Recorder()
    async with running(broker, recorder):
        pass  # the first run declares the durable queue
    await broker.publish(b"while stopped")
    assert await broker.ready_count(broker.queue) == 1
    # A second run re-declares the same topology (idempotent) and drains the backlog.
    async with running(broker, recorder):
        await wait_for(lambda: recorder.handled == [b"while stopped"], WAIT,
                       what="the backlog is handled")


# -- shutdown and start-up -----------------------------------------------------------


async def test_stop_requeues_a_message_whose_handler_is_still_running(broker: Broker) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(body: bytes, headers: Mapping[str, object]) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer = BucketEventConsumer(broker.settings, stuck, queue_name=broker.queue,
                                   log=RecordingLog())
    await consumer.start()
    try:
        await broker.publish(b"in flight")
        await asyncio.wait_for(started.wait(), WAIT)
        assert consumer.messages_in_flight == 1
    finally:
        await consumer.stop(drain_timeout=0.2)
    assert cancelled.is_set()
    assert consumer.messages_in_flight == 0

    body, redelivered = await broker.take(broker.queue)
    assert (body, redelivered) == (b"in flight", True)


async def test_stop_waits_for_handlers_that_finish_within_the_drain_timeout(
    broker: Broker,
) -> None:
    finished: list[bytes] = []
    started = asyncio.Event()

    async def slowish(body: bytes, headers: Mapping[str, object]) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(body)

    consumer = BucketEventConsumer(broker.settings, slowish, queue_name=broker.queue,
                                   log=RecordingLog())
    await consumer.start()
    try:
        await broker.publish(b"short job")
        await asyncio.wait_for(started.wait(), WAIT)
    finally:
        await consumer.stop(drain_timeout=WAIT)
    assert finished == [b"short job"]
    assert await broker.ready_count(broker.queue) == 0


async def test_start_fails_fast_with_a_temporary_error_when_the_broker_is_unreachable() -> None:
    settings = AmqpSettings(url="amqp://guest:secret-password@127.0.0.1:1/")
    consumer = BucketEventConsumer(settings, Recorder(), queue_name="lvw-test-unreachable",
                                   log=RecordingLog())
    began = time.monotonic()
    with pytest.raises(TemporaryError, match=r"cannot connect to the AMQP broker") as raised:
        await consumer.start()
    assert time.monotonic() - began < 5
    assert "secret-password" not in str(raised.value)
    assert not consumer.connected and not consumer.consuming


async def test_start_refuses_an_existing_queue_with_other_arguments_as_permanent(
    broker: Broker,
) -> None:
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(broker.queue, durable=True)  # no dead-letter arguments
    consumer = BucketEventConsumer(broker.settings, Recorder(), queue_name=broker.queue,
                                   log=RecordingLog())
    with pytest.raises(PermanentError, match="refused the topology"):
        await consumer.start()
    assert not consumer.connected


# -- an exchange declared by MinIO (or anyone) before the watcher ---------------------


def exchange_properties(name: str) -> dict[str, Any] | None:
    """The broker's record of exchange ``name`` (type, durable, auto_delete), or None."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_exchanges", "name", "type", "durable", "auto_delete",
         "--formatter", "json"], check=True, capture_output=True, text=True, timeout=60).stdout
    return next((row for row in json.loads(out) if row["name"] == name), None)


async def predeclare(broker: Broker, exchange_type: aio_pika.ExchangeType, *, durable: bool,
                     auto_delete: bool = False) -> None:
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(broker.exchange, exchange_type, durable=durable,
                                       auto_delete=auto_delete)


async def test_an_existing_non_durable_exchange_is_used_as_it_is(broker: Broker) -> None:
    """MinIO's documented notify_amqp settings declare the exchange with durable off."""
    await predeclare(broker, aio_pika.ExchangeType.FANOUT, durable=False)
    recorder = Recorder()
    async with running(broker, recorder):
        await broker.publish(b"from minio")
        await wait_for(lambda: recorder.handled == [b"from minio"], WAIT,
                       what="the message is handled")
    assert exchange_properties(broker.exchange) == {
        "name": broker.exchange, "type": "fanout", "durable": False, "auto_delete": False}


async def test_an_existing_durable_auto_delete_exchange_is_used_as_it_is(broker: Broker) -> None:
    await predeclare(broker, aio_pika.ExchangeType.FANOUT, durable=True, auto_delete=True)
    recorder = Recorder()
    async with running(broker, recorder):
        await broker.publish(b"from minio")
        await wait_for(lambda: recorder.handled == [b"from minio"], WAIT,
                       what="the message is handled")
        assert exchange_properties(broker.exchange) == {
            "name": broker.exchange, "type": "fanout", "durable": True, "auto_delete": True}


async def test_an_absent_exchange_is_declared_durable(broker: Broker) -> None:
    assert exchange_properties(broker.exchange) is None
    recorder = Recorder()
    async with running(broker, recorder):
        await broker.publish(b"first")
        await wait_for(lambda: recorder.handled == [b"first"], WAIT, what="the message is handled")
    assert exchange_properties(broker.exchange) == {
        "name": broker.exchange, "type": "fanout", "durable": True, "auto_delete": False}


async def test_an_existing_exchange_of_another_type_is_refused_with_a_clear_error(
    broker: Broker,
) -> None:
    await predeclare(broker, aio_pika.ExchangeType.TOPIC, durable=True)
    consumer = BucketEventConsumer(broker.settings, Recorder(), queue_name=broker.queue,
                                   log=RecordingLog())
    with pytest.raises(PermanentError, match=r"type 'topic'.*amqp\.exchange_type is 'fanout'"):
        await consumer.start()
    assert not consumer.connected
    assert exchange_properties(broker.exchange) == {
        "name": broker.exchange, "type": "topic", "durable": True, "auto_delete": False}


async def test_a_reconnect_uses_an_existing_non_durable_exchange_as_it_is(
    broker: Broker, proxy_to: Callable[..., Proxy],
) -> None:
    """The robust channel re-declares what it declared: passively, for a found exchange."""
    await predeclare(broker, aio_pika.ExchangeType.FANOUT, durable=False)
    proxy = proxy_to(address_of(broker.url))
    via_proxy = Broker(url=proxy.url(broker.url), exchange=broker.exchange, queue=broker.queue)
    log = RecordingLog()
    recorder = Recorder()
    async with running(via_proxy, recorder, log) as consumer:
        proxy.cut()
        await wait_for(lambda: not consumer.connected, WAIT, what="the consumer sees the cut")
        await wait_for(lambda: consumer.consuming, WAIT, what="the consumer is consuming again")
        await broker.publish(b"after reconnect")
        await wait_for(lambda: recorder.handled == [b"after reconnect"], WAIT,
                       what="a message is handled after the reconnect")
    assert "amqp connection recovered; consuming again" in [e for e, _ in log.events("info")]
    assert exchange_properties(broker.exchange) == {
        "name": broker.exchange, "type": "fanout", "durable": False, "auto_delete": False}


# -- a broker outage (only ours: the consumer's connection goes through a relay) -------


async def test_consumption_resumes_after_a_broker_outage_and_redelivers_the_unsettled(
    broker: Broker, proxy_to: Callable[..., Proxy],
) -> None:
    proxy = proxy_to(address_of(broker.url))
    via_proxy = Broker(url=proxy.url(broker.url), exchange=broker.exchange, queue=broker.queue)
    log = RecordingLog()
    calls: list[bytes] = []
    release_first_attempt = asyncio.Event()

    async def handler(body: bytes, headers: Mapping[str, object]) -> None:
        calls.append(body)
        if body == b"in flight during restart" and calls.count(body) == 1:
            # The first delivery is still being handled when the broker goes away.
            await asyncio.wait_for(release_first_attempt.wait(), 60)

    async with running(via_proxy, handler, log) as consumer:
        await broker.publish(b"in flight during restart")
        await wait_for(lambda: consumer.messages_in_flight == 1, WAIT,
                       what="the handler is blocked")

        with proxy.outage():
            await wait_for(lambda: not consumer.connected, WAIT,
                           what="the consumer sees the outage")

        await wait_for(lambda: consumer.consuming, 30, what="the consumer is consuming again")
        # The unsettled message survived in the durable queue and comes back.
        await wait_for(lambda: calls.count(b"in flight during restart") == 2, WAIT,
                       what="the unsettled message is redelivered")
        await broker.publish(b"after restart")
        await wait_for(lambda: b"after restart" in calls, WAIT, what="a new message is handled")

        # The first attempt ends now; its ack has no channel left and is only logged.
        release_first_attempt.set()
        await wait_for(lambda: consumer.messages_in_flight == 0, WAIT,
                       what="every handler finished")

    assert await broker.ready_count(broker.queue) == 0
    assert await broker.ready_count(f"{broker.queue}.dead") == 0
    warnings = [event for event, _ in log.events("warning")]
    assert "amqp connection lost; reconnecting" in warnings
    assert "amqp message not settled; the broker will redeliver it" in warnings
    assert "amqp connection recovered; consuming again" in [e for e, _ in log.events("info")]
