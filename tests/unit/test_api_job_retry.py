"""An API job's temporary failures are retried by the job engine, holding no write slot.

The jobs service and two keyed workers sharing one slot, as the daemon wires them, with
the job database in a temporary file and a cache face whose S3 is "unreachable" a given
number of times. A tag-triggered reprovision submitted while the API job waits to retry
must start at once; the API job then completes, or fails on its last attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testsupport.polling import wait_for
from watcher.adapters.jobstore import JobStore
from watcher.cache import CacheEntry
from watcher.core.api_requests import FetchRequest, ImageRef
from watcher.core.backoff import Backoff
from watcher.core.errors import TemporaryError
from watcher.jobs import ApiJobs
from watcher.runtime.keyed import KeyedWorker

QUICK = Backoff(base=0.2, cap=0.2, attempts=3)
"""Retries 0.02-0.2 s apart; three attempts in all."""


class FlakyImages:
    """``ensure`` fails with a TemporaryError ``failures`` times, then returns an entry."""

    def __init__(self, failures: int, tmp: Path) -> None:
        self.failures = failures
        self.calls = 0
        self.fetching: dict[tuple[str, str], Any] = {}
        self.entry = CacheEntry(digest="ab" * 32, path=tmp / ("ab" * 32), format="qcow2",
                                virtual_size=1, size=1, image="x", bucket="b1b", key="k",
                                etag="e")
        self.failed = asyncio.Event()

    async def ensure(self, _image: object, **_kw: object) -> CacheEntry:
        self.calls += 1
        if self.calls <= self.failures:
            self.failed.set()
            raise TemporaryError("S3 is unreachable")
        return self.entry


def _wired(images: FlakyImages, tmp: Path) -> tuple[ApiJobs, KeyedWorker[str],
                                                     KeyedWorker[str], list[str]]:
    slots = asyncio.Semaphore(1)  # one write slot for both, as reprovision.max_concurrent
    started: list[str] = []

    async def reprovision(uuid: str) -> None:
        started.append(uuid)

    holder: list[ApiJobs] = []

    async def process(key: str) -> None:
        await holder[0].process(key)

    api_worker: KeyedWorker[str] = KeyedWorker(process, unit="api", max_concurrent=1,
                                               retry=QUICK, slots=slots)
    tagged: KeyedWorker[str] = KeyedWorker(reprovision, unit="reprovision", max_concurrent=1,
                                           retry=QUICK, slots=slots)
    jobs = ApiJobs(JobStore(tmp / "jobs.sqlite3"), images,  # type: ignore[arg-type]
                   calls=None, pool="p", submit=api_worker.submit,  # type: ignore[arg-type]
                   retry=QUICK)
    holder.append(jobs)
    return jobs, api_worker, tagged, started


def _fetch() -> FetchRequest:
    return FetchRequest(ImageRef("b1b", "k"), "s3://b1b/k", "qcow2", None)


async def _until(condition: Callable[[], bool], what: str) -> None:
    await wait_for(condition, timeout=10, interval=0.005, what=what)


async def test_a_tag_triggered_job_starts_while_an_api_job_waits_to_retry(
        tmp_path: Path) -> None:
    images = FlakyImages(failures=2, tmp=tmp_path)
    jobs, api_worker, tagged, started = _wired(images, tmp_path)
    record = jobs.submit_fetch(_fetch())
    await images.failed.wait()
    await _until(lambda: jobs.store.get(record.job_id).status == "pending",  # type: ignore[union-attr]
                 "the job back to pending")
    waiting = jobs.get(record.job_id)
    assert waiting is not None and waiting.error == "retrying: S3 is unreachable"
    assert waiting.to_api()["message"] == "retrying: S3 is unreachable"
    assert "error" not in waiting.to_api()  # not failed: no error for its clients yet
    tagged.submit("domain-uuid")
    await _until(lambda: started == ["domain-uuid"], "the reprovision to start")
    assert images.calls < 3, "the reprovision waited for the API job's retries"
    await _until(lambda: jobs.store.get(record.job_id).finished, "the job to end")  # type: ignore[union-attr]
    done = jobs.store.get(record.job_id)
    assert done is not None and (done.status, done.error) == ("completed", None)
    assert images.calls == 3
    await asyncio.gather(api_worker.idle(), tagged.idle())


async def test_the_last_attempt_fails_the_job_with_the_error(tmp_path: Path) -> None:
    images = FlakyImages(failures=10, tmp=tmp_path)
    jobs, api_worker, _tagged, _started = _wired(images, tmp_path)
    record = jobs.submit_fetch(_fetch())
    await _until(lambda: jobs.store.get(record.job_id).finished, "the job to end")  # type: ignore[union-attr]
    failed = jobs.store.get(record.job_id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "S3 is unreachable (gave up after 3 attempts)"
    assert images.calls == QUICK.attempts
    await api_worker.idle()
    assert api_worker.keys == []  # nothing left waiting: the job ended, the key is done


@pytest.mark.parametrize("failures", [0, 1])
async def test_a_job_that_recovers_reads_completed(tmp_path: Path, failures: int) -> None:
    images = FlakyImages(failures=failures, tmp=tmp_path)
    jobs, api_worker, _tagged, _started = _wired(images, tmp_path)
    record = jobs.submit_fetch(_fetch())
    await _until(lambda: jobs.store.get(record.job_id).finished, "the job to end")  # type: ignore[union-attr]
    body = jobs.get(record.job_id).to_api()  # type: ignore[union-attr]
    assert (body["status"], body["progress"]["stage"]) == ("completed", "finalizing")
    assert "message" not in body and "error" not in body
    await api_worker.idle()
