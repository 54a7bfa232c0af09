"""A notification publisher in its own process, so it does not share the daemon's loop.

``python -m bench.publisher EXCHANGE BUCKET KEY_PREFIX COUNT RATE [--same-key] [--transient]``
publishes COUNT MinIO-shaped notifications (persistent, as MinIO does, unless
``--transient``) at RATE per second (0 = as fast as possible), each with the header
``bench-published-ns`` = ``time.time_ns()`` at publishing. Prints the seconds publishing
took.

It publishes through ``aiormq``, the protocol library under aio-pika: aio-pika's message
objects cost the publisher enough CPU that, on two shared cores, it could not offer
5,000 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiormq
from pamqp.commands import Basic

from bench.common import AMQP_URL
from testsupport.services import minio_event

BURST = 20
"""Messages per paced burst; at 2,000/s a burst leaves every 10 ms."""


async def publish_many(exchange: str, bucket: str, prefix: str, count: int, rate: float,
                       same_key: bool, persistent: bool = True) -> float:
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.exchange_declare(exchange, exchange_type="fanout", durable=True)
        bodies = [minio_event(bucket, prefix if same_key else f"{prefix}{i:06d}.qcow2")
                  for i in range(count)]
        started = time.perf_counter()
        for first in range(0, count, BURST):
            if rate > 0:
                due = started + first / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            for body in bodies[first:first + BURST]:
                await channel.basic_publish(body, exchange=exchange, routing_key="",
                                            properties=Basic.Properties(
                                                delivery_mode=2 if persistent else 1,
                                                headers={"bench-published-ns": time.time_ns()}))
        seconds = time.perf_counter() - started
    finally:
        await connection.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("exchange")
    parser.add_argument("bucket")
    parser.add_argument("prefix")
    parser.add_argument("count", type=int)
    parser.add_argument("rate", type=float)
    parser.add_argument("--same-key", action="store_true")
    parser.add_argument("--transient", action="store_true",
                        help="delivery mode 1: the broker keeps the messages in memory only")
    args = parser.parse_args()
    seconds = asyncio.run(publish_many(args.exchange, args.bucket, args.prefix, args.count,
                                       args.rate, args.same_key, not args.transient))
    print(f"{seconds:.3f}")


if __name__ == "__main__":
    main()
