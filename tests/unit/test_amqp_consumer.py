"""The consumer's pure parts: which deliveries are acked together, and reconnect waits."""

from __future__ import annotations

from typing import cast

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.connection import make_url

from watcher.adapters.amqp import AckWindow, JitteredRobustConnection


def message(tag: int) -> AbstractIncomingMessage:
    """A stand-in: AckWindow only stores and returns the message objects."""
    return cast(AbstractIncomingMessage, f"message-{tag}")


def window_with(*tags: int) -> AckWindow:
    window = AckWindow()
    for tag in tags:
        window.delivered(tag, message(tag))
    return window


def test_nothing_finished_means_nothing_to_ack() -> None:
    window = window_with(1, 2, 3)
    assert window.take() == (None, [])
    assert len(window) == 3


def test_a_finished_prefix_is_acked_with_one_multiple_ack_on_its_last_tag() -> None:
    window = window_with(1, 2, 3, 4)
    for tag in (1, 2, 3):
        window.finished(tag)
    assert window.take() == (message(3), [])
    assert len(window) == 1


def test_finished_deliveries_behind_a_running_one_are_acked_alone() -> None:
    """A slow download must not hold back the acks of everything after it."""
    window = window_with(1, 2, 3, 4)
    for tag in (1, 3, 4):
        window.finished(tag)
    assert window.take() == (message(1), [message(3), message(4)])
    window.finished(2)
    assert window.take() == (message(2), [])
    assert len(window) == 0


def test_a_rejected_delivery_leaves_the_window_and_does_not_block_the_prefix() -> None:
    window = window_with(1, 2, 3)
    window.finished(1)
    window.forget(2)
    window.finished(3)
    assert window.take() == (message(3), [])


def test_finishing_an_unknown_tag_is_ignored() -> None:
    window = window_with(1)
    window.finished(7)
    assert window.take() == (None, [])


async def test_reconnect_waits_are_jittered_around_the_configured_interval() -> None:
    connection = JitteredRobustConnection(make_url("amqp://guest:guest@127.0.0.1:1/"),
                                          reconnect_interval=2.0)
    waits = [connection.reconnect_interval for _ in range(200)]
    assert all(1.0 <= wait <= 3.0 for wait in waits)
    assert len(set(waits)) > 100, "every wait is drawn anew"
