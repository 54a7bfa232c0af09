"""The exchange, queues and bindings one host consumes from, declared so that MinIO's own
exchange stays as MinIO made it.

The notification exchange belongs to MinIO, which declares it with its own flags (its
documented defaults have durable off). An existing exchange is therefore used as it is,
and re-declared passively after a reconnect (until it exists again, the reconnect keeps
retrying); only an absent one is declared, durable, of the configured type. The host's
queue is durable and dead-letters into ``<queue>.dead`` through ``<queue>.dlx``; with
``amqp.queue_type: quorum`` both queues are quorum queues and the host's queue has
``x-delivery-limit``, so a message whose consumer dies every time is dead-lettered after
that many deliveries instead of crashing the host in a loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)

from watcher.core.errors import PermanentError
from watcher.settings import AmqpSettings, AmqpTuning


class _Log(Protocol):
    def warning(self, event: str, **fields: Any) -> Any: ...


def dead_letter_exchange_name(queue: str) -> str:
    return f"{queue}.dlx"


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dead"


@dataclass(frozen=True)
class Topology:
    """What was declared; held strongly, as the robust channel restores only what lives."""

    exchange: AbstractRobustExchange
    dead_letter_exchange: AbstractRobustExchange
    dead_letter_queue: AbstractRobustQueue
    queue: AbstractRobustQueue


async def declare(connection: AbstractRobustConnection, channel: AbstractRobustChannel,
                  settings: AmqpSettings, tuning: AmqpTuning, queue_name: str,
                  log: _Log) -> Topology:
    """Declare (or find) the exchange, the host's queue and its dead-letter pair, and bind.

    ``PermanentError`` for an unknown or mismatched exchange type; broker errors are the
    caller's to translate.
    """
    try:
        exchange_type = aio_pika.ExchangeType(settings.exchange_type)
    except ValueError as exc:
        raise PermanentError(f"unknown AMQP exchange type {settings.exchange_type!r}") from exc
    timeout = tuning.operation_timeout
    # The robust channel re-declares the exchange with these same flags on every
    # reconnect: passively when it was found, so never over its owner's flags.
    if await _exchange_exists(connection, settings, exchange_type, tuning, log):
        exchange = await channel.declare_exchange(settings.exchange, passive=True,
                                                  timeout=timeout)
    else:
        exchange = await channel.declare_exchange(settings.exchange, exchange_type,
                                                  durable=True, timeout=timeout)
    dlx_name = dead_letter_exchange_name(queue_name)
    dead_name = dead_letter_queue_name(queue_name)
    dead_letter_exchange = await channel.declare_exchange(
        dlx_name, aio_pika.ExchangeType.DIRECT, durable=True, timeout=timeout)
    dead_letter_queue = await channel.declare_queue(
        dead_name, durable=True, arguments=_type_arguments(settings), timeout=timeout)
    await dead_letter_queue.bind(dead_letter_exchange, routing_key=dead_name, timeout=timeout)
    queue = await channel.declare_queue(
        queue_name, durable=True,
        arguments={"x-dead-letter-exchange": dlx_name, "x-dead-letter-routing-key": dead_name,
                   **_delivery_limit_arguments(settings)},
        timeout=timeout)
    await queue.bind(exchange, routing_key=settings.routing_key, timeout=timeout)
    return Topology(exchange, dead_letter_exchange, dead_letter_queue, queue)


def _type_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """``x-queue-type`` for a quorum queue (replicated); classic queues declare none."""
    return {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}


def _delivery_limit_arguments(settings: AmqpSettings) -> dict[str, Any]:
    """A quorum queue dead-letters a message delivered ``delivery_limit`` times without
    being settled (its consumer crashed each time) instead of redelivering it forever."""
    if settings.queue_type != "quorum":
        return {}
    return {**_type_arguments(settings), "x-delivery-limit": settings.delivery_limit}


async def _exchange_exists(
    connection: AbstractRobustConnection, settings: AmqpSettings,
    exchange_type: aio_pika.ExchangeType, tuning: AmqpTuning, log: _Log,
) -> bool:
    """Whether the notification exchange exists; refuses one of another type.

    MinIO declares its exchange itself, with its own durable and auto-delete flags, so
    an existing one is used as it is. A passive declare cannot see the type, so a
    second probe declares it with the configured type: RabbitMQ compares the type
    before any flag, so an error about another argument means the type is right. Both
    probes use plain channels: a refused declare closes its channel, and a robust one
    would reopen itself.
    """
    name = settings.exchange
    try:
        async with aio_pika.Channel(connection, publisher_confirms=False) as probe:
            await probe.declare_exchange(name, passive=True,
                                         timeout=tuning.operation_timeout)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    try:
        async with aio_pika.Channel(connection, publisher_confirms=False) as probe:
            await probe.declare_exchange(
                name, exchange_type, durable=True, timeout=tuning.operation_timeout
            )
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        found = _inequivalent_type(str(exc))
        if found is not None:
            raise PermanentError(
                f"AMQP exchange {name!r} exists with type {found!r} but "
                f"amqp.exchange_type is {exchange_type.value!r}; set amqp.exchange_type "
                f"(and amqp.routing_key) to match MinIO's notify_amqp settings"
            ) from exc
    except aiormq.exceptions.ChannelAccessRefused:
        # No configure permission on someone else's exchange: use it unchecked.
        log.warning(
            "amqp exchange type not checked: no configure permission",
            exchange=name,
            exchange_type=exchange_type.value,
        )
    return True


def _inequivalent_type(error: str) -> str | None:
    """The existing type named by RabbitMQ's "inequivalent arg 'type' ... current is 'X'"
    refusal, or None when the refusal is about another argument."""
    match = re.search(r"inequivalent arg 'type'.*current is '([^']*)'", error)
    return match.group(1) if match else None
