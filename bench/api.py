"""The HTTP job API: what HTTP and the job engine add to a write, and status reads under load.

The daemon runs as a process (``testsupport.api.api_daemon``: a dir pool of its own, a
token, ``/readyz`` awaited), the image is cached first and the volume exists, so a job is
the write and its bookkeeping only:

- (a) overhead per job = (POST sent -> job first seen ``running`` by a GET) + (the job's
  ``updated_at`` as ``completed`` in the database -> first GET showing it). The client
  polls every ``POLL`` s on one keep-alive connection, so each half carries up to one
  poll interval plus a GET. Beside it, the job's own time (its "api job finished" log
  line) and ``qemu-img convert`` run directly onto the same volume with the daemon's own
  command, interleaved with the jobs.
- (b) 100 concurrent ``GET /api/v1/jobs/{id}`` while a job writes: one aiohttp session
  with a pool of 100 keep-alive connections (one per concurrent request, opened by an
  unmeasured first round), rounds repeated while the job runs; only rounds whose every
  answer said ``running`` count.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import MIB, Options, Stopwatch, Table, median, percentile, run, spread, verdict
from bench.world import World, world
from testsupport.api import ApiDaemon, api_daemon
from watcher.adapters.qemu_img import convert_argv

TOKEN = "bench-api-token-" + "d" * 24
POLL = 0.002
CONCURRENT = 100
ROUNDS = 10
VOLUME = "bench-api-vol"
ENDED = ("completed", "failed")


def bench(options: Options) -> list[Table]:
    with world(options.scratch, "api") as here:
        image = _image(here, options.writer_size)
        pool = f"lvw-bench-{here.root.name}"
        with api_daemon(here.root, pool, partial(here.write_config, here.root / "cache"),
                        token=TOKEN) as api:
            return asyncio.run(_measure(options, here, api, image))


def _image(here: World, size: int) -> Path:
    """A qcow2 of ``size`` virtual bytes, every other MiB random, uploaded with its sidecar."""
    raw, image = here.root / "image.raw", here.root / "image.qcow2"
    with open(raw, "wb") as fh:
        for i in range(size // MIB):
            fh.write(os.urandom(MIB) if i % 2 == 0 else bytes([i % 251 + 1]) * MIB)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)])
    raw.unlink()
    here.upload_with_sidecar("images/bench.qcow2", image)
    return image


async def _measure(options: Options, here: World, api: ApiDaemon, image: Path) -> list[Table]:
    url = f"s3://{here.bucket}/images/bench.qcow2"
    body = {"image_url": url, "volume_name": VOLUME, "volume_size_gb": 1}
    async with aiohttp.ClientSession(api.base_url, headers=api.auth_header) as http:
        fetched = await _wait(http, await _post(http, "/api/v1/cache/fetch", {"image_url": url}))
        assert fetched["status"] == "completed", fetched
        first = await _wait(http, await _post(http, "/api/v1/jobs", body))
        assert first["status"] == "completed", first
        cached, volume = Path(fetched["image_path"]), Path(first["volume_path"])
        direct_io = _accepts_o_direct(volume)
        overheads, to_running, to_visible, jobs, own, direct = [], [], [], [], [], []
        for _ in range(options.runs):
            with Stopwatch() as sw:
                run(convert_argv(cached, "qcow2", volume, target_is_block=False,
                                 direct_io=direct_io))
            direct.append(sw.seconds)
            sample = await _timed_job(http, body)
            to_running.append(sample["to_running"])
            to_visible.append(sample["to_visible"])
            overheads.append(sample["to_running"] + sample["to_visible"])
            jobs.append(sample["client_total"])
            own.append(_job_seconds(api, sample["job_id"]))
        latencies = await _concurrent_reads(http, api, body)

    a = Table(f"API job onto an existing volume, image cached: {options.writer_size // MIB} MiB "
              f"virtual (median of {options.runs}, min-max)",
              ["measure", "median", "min-max", "target", "verdict"])
    ms = [1000 * v for v in overheads]
    a.add("HTTP overhead: POST -> running + completed -> visible", f"{median(ms):.1f} ms",
          spread(ms), "<= 50 ms", verdict(median(ms) <= 50))
    a.add("  POST sent -> first GET seeing running",
          f"{1000 * median(to_running):.1f} ms", spread([1000 * v for v in to_running]), "", "")
    a.add("  completed in the DB -> first GET seeing it",
          f"{1000 * median(to_visible):.1f} ms", spread([1000 * v for v in to_visible]), "", "")
    a.add("job as the client saw it (POST -> completed seen)", f"{median(jobs):.3f} s",
          spread(jobs), "", "")
    a.add("job's own time (its log line)", f"{median(own):.3f} s", spread(own), "", "")
    a.add("qemu-img convert directly onto the same volume", f"{median(direct):.3f} s",
          spread(direct), "", "")
    a.notes.append(f"client polls every {1000 * POLL:.0f} ms on one keep-alive connection; "
                   "each half of the overhead includes up to one poll interval and one GET")
    a.notes.append("job's own time minus direct qemu-img = the job's checks, planning, "
                   "libvirt calls and fsync, not HTTP")
    b = Table(f"{CONCURRENT} concurrent GETs of a job's status while it writes "
              f"({len(latencies)} requests in {len(latencies) // CONCURRENT} rounds)",
              ["measure", "value", "target", "verdict"])
    lat = [1000 * v for v in latencies]
    b.add("p50", f"{percentile(lat, 0.5):.1f} ms", "", "")
    b.add("p99", f"{percentile(lat, 0.99):.1f} ms", "< 20 ms",
          verdict(percentile(lat, 0.99) < 20))
    b.add("max", f"{max(lat):.1f} ms", "", "")
    b.notes.append(f"one aiohttp session, a pool of {CONCURRENT} keep-alive connections (one "
                   "per concurrent request); the client shares the machine's 2 cores with "
                   "the daemon and qemu-img, and its own scheduling is in the numbers")
    return [a, b]


async def _post(http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> str:
    async with http.post(path, json=body) as reply:
        answer = await reply.json()
        assert reply.status == 202, answer
        return str(answer["job_id"])


async def _get(http: aiohttp.ClientSession, job_id: str) -> dict[str, Any]:
    async with http.get(f"/api/v1/jobs/{job_id}") as reply:
        answer: dict[str, Any] = await reply.json()
        assert reply.status == 200, answer
        return answer


async def _wait(http: aiohttp.ClientSession, job_id: str, timeout: float = 600, *,
                until: tuple[str, ...] = ENDED, interval: float = 0.05) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (job := await _get(http, job_id))["status"] not in until:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(interval)
    return job


async def _timed_job(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    sent = time.perf_counter()
    job_id = await _post(http, "/api/v1/jobs", body)
    running_at: float | None = None
    while True:
        job = await _get(http, job_id)
        now, wall = time.perf_counter(), time.time()
        if running_at is None and job["status"] != "pending":
            running_at = now
        if job["status"] in ENDED:
            break
        await asyncio.sleep(POLL)
    assert job["status"] == "completed" and running_at is not None, job
    finished = datetime.fromisoformat(job["updated_at"]).timestamp()
    return {"job_id": job_id, "to_running": running_at - sent,
            "to_visible": max(0.0, wall - finished), "client_total": now - sent}


def _job_seconds(api: ApiDaemon, job_id: str) -> float:
    assert api.daemon.log is not None
    for line in api.daemon.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line[line.find("{"):])
        except ValueError:
            continue
        if record.get("event") == "api job finished" and record.get("job_id") == job_id:
            return float(record["seconds"])
    raise AssertionError(f"no 'api job finished' line for {job_id}")


async def _concurrent_reads(http: aiohttp.ClientSession, api: ApiDaemon,
                            body: dict[str, Any]) -> list[float]:
    connector = aiohttp.TCPConnector(limit=CONCURRENT)
    async with aiohttp.ClientSession(api.base_url, headers=api.auth_header,
                                     connector=connector) as pool:
        async def one(job_id: str) -> tuple[float, str]:
            started = time.perf_counter()
            async with pool.get(f"/api/v1/jobs/{job_id}") as reply:
                status = (await reply.json())["status"]
            return time.perf_counter() - started, str(status)

        latencies: list[float] = []
        warmed = False
        while len(latencies) < ROUNDS * CONCURRENT:
            job_id = await _post(http, "/api/v1/jobs", body)
            await _wait(http, job_id, until=("running", *ENDED), interval=POLL)
            while len(latencies) < ROUNDS * CONCURRENT:
                answers = await asyncio.gather(*(one(job_id) for _ in range(CONCURRENT)))
                if not all(status == "running" for _, status in answers):
                    break  # the write ended during the round: start another job
                if warmed:
                    latencies += [seconds for seconds, _ in answers]
                warmed = True
            await _wait(http, job_id)
        return latencies


def _accepts_o_direct(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True
