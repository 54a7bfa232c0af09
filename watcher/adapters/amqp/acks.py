"""Which deliveries can be acknowledged together.

One ack frame per notification was a third of the CPU spent on it, so finished deliveries
are acknowledged in batches: ``multiple=True`` up to the highest delivery tag whose
predecessors all finished, and single acks for finished ones behind a delivery still
running. Pure bookkeeping; the consumer sends the frames.
"""

from __future__ import annotations

from aio_pika.abc import AbstractIncomingMessage


class AckWindow:
    """Deliveries of one channel that are not settled yet, in delivery order.

    Pure bookkeeping: ``take`` says which finished deliveries to acknowledge and how, and
    the caller sends the frames. Delivery tags grow per channel, so the insertion order of
    the dict is the delivery order.
    """

    def __init__(self) -> None:
        self._open: dict[int, tuple[AbstractIncomingMessage, bool]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def delivered(self, tag: int, message: AbstractIncomingMessage) -> None:
        self._open[tag] = (message, False)

    def finished(self, tag: int) -> None:
        """The delivery's handler succeeded; its ack may now be sent."""
        if tag in self._open:
            self._open[tag] = (self._open[tag][0], True)

    def forget(self, tag: int) -> None:
        """The delivery was settled on its own (rejected or requeued)."""
        self._open.pop(tag, None)

    def take(self) -> tuple[AbstractIncomingMessage | None, list[AbstractIncomingMessage]]:
        """``(last, singles)``: ack ``last`` with ``multiple=True`` (it and every open
        delivery before it finished), then each of ``singles`` alone. Both leave the window.
        """
        last: AbstractIncomingMessage | None = None
        singles: list[AbstractIncomingMessage] = []
        in_prefix = True
        for tag, (message, done) in list(self._open.items()):
            if not done:
                in_prefix = False
                continue
            del self._open[tag]
            if in_prefix:
                last = message
            else:
                singles.append(message)
        return last, singles
