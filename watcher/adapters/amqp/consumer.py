"""Consume MinIO bucket notifications from RabbitMQ without losing any.

Bucket events are the trigger for pre-warming the cache, so this adapter's job is to hand
each one to the daemon's handler exactly as RabbitMQ delivered it and to settle the message
only once the handler has finished:

- handled normally -> ack;
- the handler failed (malformed event, permanent or temporary error, a bug) -> reject
  without requeue, so RabbitMQ dead-letters it into ``<queue>.dead``. A temporary failure
  that outlived the handler's own retries is not requeued either: a requeue would redeliver
  it at once in a hot loop, while the periodic reconcile of the bucket repairs it anyway;
- cancelled while shutting down -> nack with requeue, so another run handles it.

Acks are batched a few milliseconds later (``acks``). A handler that needs no I/O
returns None, and its message is acked without spawning a task. The exchange and queues
are declared by ``topology`` (MinIO's exchange is used as it exists).

The connection is ``aio_pika.connect_robust``: the first connection must succeed (a daemon
started against a wrong URL fails at once), and later losses are repaired forever, with a
jittered wait between attempts. The robust channel re-declares the exchanges and queues
and resumes consuming. Messages that were in flight when the connection dropped cannot be
settled any more; RabbitMQ redelivers them on the new connection (the handler is
idempotent: delivery is at-least-once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol

import aiormq
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
    ConsumerTag,
)
from aio_pika.connection import make_url

from watcher import telemetry
from watcher.adapters.amqp import topology
from watcher.adapters.amqp.acks import AckWindow
from watcher.adapters.amqp.connection import JitteredRobustConnection, redacted
from watcher.core.errors import MalformedEvent, PermanentError, TemporaryError
from watcher.settings import AMQP_TUNING, AmqpSettings, AmqpTuning

MessageHandler = Callable[[bytes, Mapping[str, object]], Awaitable[None] | None]
"""Receives the raw body and the AMQP headers of one notification.

Returns None when the message is done, or an awaitable that finishes it (an ``async def``
handler is one). Raising, at once or from the awaitable, dead-letters the message.
"""

Settlement = Literal["dead-letter", "requeue"]


class EventLog(Protocol):
    """The part of a structlog logger this adapter uses: an event name plus fields."""

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...

    def error(self, event: str, **fields: Any) -> Any: ...


class BucketEventConsumer:
    """One durable queue of bucket notifications, consumed with bounded concurrency."""

    def __init__(
        self,
        settings: AmqpSettings,
        handler: MessageHandler,
        *,
        queue_name: str,
        log: EventLog | None = None,
        reconnect_interval: float = 2.0,
        tuning: AmqpTuning = AMQP_TUNING,
    ) -> None:
        self._settings = settings
        self._tuning = tuning
        self._handler = handler
        self._queue_name = queue_name
        self._log: EventLog = log if log is not None else structlog.get_logger(__name__)
        self._reconnect_interval = reconnect_interval

        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        # Strong references: the robust channel re-declares only what is still alive.
        self._exchange: AbstractRobustExchange | None = None
        self._dead_letter_exchange: AbstractRobustExchange | None = None
        self._queue: AbstractRobustQueue | None = None
        self._dead_letter_queue: AbstractRobustQueue | None = None
        self._consumer_tag: ConsumerTag | None = None

        self._link_up = False
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._last_message_at: float | None = None
        # Unsettled deliveries per channel object: tags restart on a reconnected channel.
        self._windows: dict[aiormq.abc.AbstractChannel, AckWindow] = {}
        self._acks_due = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None

    # -- names -----------------------------------------------------------------------

    @property
    def queue_name(self) -> str:
        return self._queue_name

    @property
    def dead_letter_exchange_name(self) -> str:
        return topology.dead_letter_exchange_name(self._queue_name)

    @property
    def dead_letter_queue_name(self) -> str:
        return topology.dead_letter_queue_name(self._queue_name)

    # -- state for readiness and metrics ---------------------------------------------

    @property
    def connected(self) -> bool:
        """The broker connection is up (false while the robust connection reconnects)."""
        connection = self._connection
        return (
            connection is not None
            and not connection.is_closed
            and connection.connected.is_set()
            and self._link_up
        )

    @property
    def consuming(self) -> bool:
        """Deliveries can arrive: connected, the channel open and our consumer registered."""
        channel = self._channel
        return (
            self.connected
            and not self._stopping
            and self._consumer_tag is not None
            and channel is not None
            and not channel.is_closed
        )

    @property
    def last_message_at(self) -> float | None:
        """``time.monotonic()`` of the last delivery, or None before the first one."""
        return self._last_message_at

    @property
    def messages_in_flight(self) -> int:
        """Deliveries whose handler has not finished yet."""
        return len(self._in_flight)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, declare the topology, and start consuming.

        Raises TemporaryError when the broker cannot be reached and PermanentError when it
        refuses the topology (for instance a queue of that name with other arguments).
        """
        if self._connection is not None:
            raise RuntimeError("BucketEventConsumer.start() called twice")
        self._stopping = False
        # What connect_robust() does, but keeping the object so that a failed first
        # attempt is closed here rather than by a stray task from its finalizer.
        connection = JitteredRobustConnection(
            make_url(self._settings.url), reconnect_interval=self._reconnect_interval
        )
        try:
            # The outer bound also covers the broker handshake, not only the TCP connect.
            async with asyncio.timeout(self._tuning.connect_timeout):
                await connection.connect(timeout=self._tuning.connect_timeout)
        except Exception as exc:  # any failure of the first attempt: refused, auth, timeout
            await connection.close()
            raise TemporaryError(
                f"cannot connect to the AMQP broker at {redacted(self._settings.url)}: {exc}"
            ) from exc
        self._connection = connection
        self._link_up = True
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._ack_task = asyncio.create_task(self._ack_loop(), name="amqp-acks")
        try:
            await self._declare_and_consume(connection)
        except BaseException:
            await self._stop_acks()
            await self._close_connection()
            raise
        self._log.info(
            "amqp consumer started",
            queue=self._queue_name,
            exchange=self._settings.exchange,
            prefetch=self._settings.prefetch,
        )

    async def stop(self, drain_timeout: float) -> None:
        """Stop taking messages, let handlers finish for ``drain_timeout`` seconds, then
        cancel the rest (their messages are requeued) and close the connection."""
        self._stopping = True
        await self._cancel_consumer()

        if self._in_flight:
            _, unfinished = await asyncio.wait(set(self._in_flight), timeout=drain_timeout)
            if unfinished:
                self._log.warning(
                    "amqp handlers still running after drain; cancelling them",
                    queue=self._queue_name,
                    count=len(unfinished),
                    drain_timeout=drain_timeout,
                )
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)

        await self._stop_acks()
        await self._close_connection()
        self._log.info("amqp consumer stopped", queue=self._queue_name)

    # -- internals -------------------------------------------------------------------

    async def _declare_and_consume(self, connection: AbstractRobustConnection) -> None:
        try:
            channel = connection.channel(publisher_confirms=False)
            self._channel = channel
            await channel.initialize(timeout=self._tuning.operation_timeout)
            await channel.set_qos(prefetch_count=self._settings.prefetch,
                                  timeout=self._tuning.operation_timeout)
            declared = await topology.declare(connection, channel, self._settings,
                                              self._tuning, self._queue_name, self._log)
            self._exchange = declared.exchange
            self._dead_letter_exchange = declared.dead_letter_exchange
            self._queue, self._dead_letter_queue = declared.queue, declared.dead_letter_queue
            self._consumer_tag = await self._queue.consume(
                self._on_delivery, timeout=self._tuning.operation_timeout
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise PermanentError(
                f"RabbitMQ refused the topology of queue {self._queue_name!r} (an exchange or "
                f"queue of that name exists with other settings; delete it or choose another "
                f"name): {exc}"
            ) from exc
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise PermanentError(f"RabbitMQ refused access: {exc}") from exc
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            raise TemporaryError(f"declaring queue {self._queue_name!r} failed: {exc}") from exc

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        """Called by aio-pika for each delivery: triage at once, spawn a task only for work."""
        self._last_message_at = time.monotonic()
        if self._stopping:
            # Delivered between our cancel and the broker's confirmation: leave it queued.
            await self._settle(message, "requeue")
            return
        tag = message.delivery_tag
        if tag is None:  # only basic.get replies lack one; a consumer never sees them
            return
        # Kept: the message's own accessor raises once its channel has closed.
        channel = message.channel
        self._windows.setdefault(channel, AckWindow()).delivered(tag, message)
        try:
            work = self._handler(message.body, message.headers)
        except Exception as exc:
            self._log_dead_letter(message, exc)
            await self._settle(message, "dead-letter", channel)
            return
        if work is None:
            self._finished(message, channel)
            return
        task = asyncio.create_task(
            self._finish(message, channel, work), name=f"amqp-message-{tag}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _finish(
        self, message: AbstractIncomingMessage, channel: aiormq.abc.AbstractChannel,
        work: Awaitable[None],
    ) -> None:
        try:
            await work
        except asyncio.CancelledError:
            await self._settle(message, "requeue", channel)
            raise
        except Exception as exc:
            self._log_dead_letter(message, exc)
            await self._settle(message, "dead-letter", channel)
        else:
            self._finished(message, channel)

    def _finished(
        self, message: AbstractIncomingMessage, channel: aiormq.abc.AbstractChannel,
    ) -> None:
        """The handler succeeded: the ack goes out with the next batch."""
        window = self._windows.get(channel)
        if channel.is_closed or window is None or message.delivery_tag is None:
            self._log_unsettled(message, "ack", "the channel closed while it was handled")
            return
        window.finished(message.delivery_tag)
        self._acks_due.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._acks_due.wait()
            await asyncio.sleep(self._tuning.ack_delay)
            self._acks_due.clear()
            await self._send_acks()

    async def _send_acks(self) -> None:
        for channel, window in list(self._windows.items()):
            last, singles = window.take()
            try:
                if last is not None:
                    await last.ack(multiple=True)
                for message in singles:
                    await message.ack()
            except Exception as exc:
                # The channel is gone: RabbitMQ put its unacked messages back already.
                self._windows.pop(channel, None)
                for message in ([last] if last is not None else []) + singles:
                    self._log_unsettled(message, "ack", f"{type(exc).__name__}: {exc}")
                continue
            if not window and channel.is_closed:
                self._windows.pop(channel, None)

    async def _stop_acks(self) -> None:
        """Send the acks still due, then end the ack loop."""
        task, self._ack_task = self._ack_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._send_acks()
        self._windows.clear()

    async def _settle(
        self, message: AbstractIncomingMessage, outcome: Settlement,
        channel: aiormq.abc.AbstractChannel | None = None,
    ) -> None:
        """Reject or requeue one delivery on its own, now."""
        try:
            if outcome == "dead-letter":
                await message.reject(requeue=False)
            else:
                await message.nack(requeue=True)
        except Exception as exc:
            # The delivery's channel is gone (the connection dropped): RabbitMQ has
            # already put the message back and will redeliver it.
            self._log_unsettled(message, outcome, f"{type(exc).__name__}: {exc}")
        # Only now: a batched multiple-ack sent before the reject would have covered it.
        window = self._windows.get(channel) if channel is not None else None
        if window is not None and message.delivery_tag is not None:
            window.forget(message.delivery_tag)

    def _log_unsettled(self, message: AbstractIncomingMessage, outcome: str, error: str) -> None:
        self._log.warning(
            "amqp message not settled; the broker will redeliver it",
            queue=self._queue_name,
            outcome=outcome,
            delivery_tag=message.delivery_tag,
            message_id=message.message_id,
            error=error,
        )

    def _log_dead_letter(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        if isinstance(exc, MalformedEvent):
            reason = "malformed"
        elif isinstance(exc, PermanentError):
            reason = "permanent"
        elif isinstance(exc, TemporaryError):
            reason = "temporary"
        else:
            reason = "unexpected"
        telemetry.events_dead_lettered.labels(reason=reason).inc()
        self._log.error(
            "amqp message dead-lettered",
            queue=self._queue_name,
            dead_letter_queue=self.dead_letter_queue_name,
            reason=reason,
            error=f"{type(exc).__name__}: {exc}",
            message_id=message.message_id,
            delivery_tag=message.delivery_tag,
            redelivered=message.redelivered,
            body=message.body[:self._tuning.dead_letter_preview_bytes].decode(
                "utf-8", "backslashreplace"),
        )

    async def _cancel_consumer(self) -> None:
        queue, tag = self._queue, self._consumer_tag
        self._consumer_tag = None
        if queue is None or tag is None:
            return
        try:
            # Bounded: while the broker is away the cancel would wait for a reconnect.
            async with asyncio.timeout(self._tuning.operation_timeout):
                await queue.cancel(tag)
        except Exception as exc:
            self._log.warning(
                "amqp consumer cancel failed; closing the connection stops deliveries",
                queue=self._queue_name,
                error=f"{type(exc).__name__}: {exc}",
            )

    async def _close_connection(self) -> None:
        channel, connection = self._channel, self._connection
        self._channel = None
        self._connection = None
        self._link_up = False
        for closable in (channel, connection):
            if closable is None:
                continue
            try:
                async with asyncio.timeout(self._tuning.operation_timeout):
                    await closable.close()
            except Exception as exc:
                self._log.warning(
                    "amqp close failed",
                    queue=self._queue_name,
                    error=f"{type(exc).__name__}: {exc}",
                )
        self._exchange = self._dead_letter_exchange = None
        self._queue = self._dead_letter_queue = None

    def _on_connection_lost(self, _connection: object, exc: BaseException | None) -> None:
        if not self._link_up or self._stopping:
            return
        self._link_up = False
        self._log.warning(
            "amqp connection lost; reconnecting",
            queue=self._queue_name,
            error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
            reconnect_interval=self._reconnect_interval,
            in_flight=len(self._in_flight),
        )

    def _on_reconnected(self, _connection: object) -> None:
        self._link_up = True
        self._log.info("amqp connection recovered; consuming again", queue=self._queue_name)


