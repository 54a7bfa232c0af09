"""``PUT /volumes/upload-content``: a request body (a cloud-init seed ISO) into a volume.

Why it exists: the predecessor's clients upload a small seed image next to the root
volume before they start the VM. The body goes straight onto the volume, with the same
checks as an image write: the pool holds files or LVs, the volume is created with the
body's size when missing and grown when smaller (never shrunk), no domain that is not
shut off uses it and no process has it open, and the start interlock holds while the
bytes go in. Any libvirt pool of a writable type is accepted (the predecessor's
default is ``cloud-init``); the volume name is checked like any other.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from watcher import telemetry
from watcher.adapters import write_markers
from watcher.adapters.filesink import fsync_path
from watcher.core.api_requests import UploadRequest
from watcher.core.errors import PermanentError, Refused
from watcher.core.volume_plan import WRITABLE_POOL_TYPES, usage_refusal
from watcher.executor.calls import users_of
from watcher.jobs.volume import StorageCalls

WRITE_CHUNK = 1024**2
"""Bytes gathered from the body before one write to the volume."""


class UploadRefused(PermanentError):
    """Nothing was written; ``status`` is the HTTP status the route answers with."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status


class Uploader:
    def __init__(self, calls: StorageCalls, log: Any = None) -> None:
        self.calls = calls
        self.log = log if log is not None else telemetry.get_logger(component="upload")

    async def upload(self, request: UploadRequest, body: AsyncIterator[bytes]) -> int:
        """Write ``body`` (``request.length`` bytes) onto the volume; the bytes written."""
        shown = f"{request.pool}/{request.volume_name}"
        info = await self.calls.pool_info(request.pool)
        if info is None:
            raise UploadRefused(404, f"no storage pool {request.pool!r}")
        if info.type not in WRITABLE_POOL_TYPES or not info.active:
            raise UploadRefused(409, f"pool {request.pool} ({info.type}, "
                                f"{'active' if info.active else 'inactive'}) cannot take uploads")
        volume = await self.calls.pool_volume(request.pool, request.volume_name)
        if volume is None:
            volume = await self.calls.create_volume(request.pool, request.volume_name,
                                                    request.length)
            self.log.info("volume created", pool=request.pool, volume=request.volume_name,
                          size=request.length)
        real = await asyncio.to_thread(os.path.realpath, volume.path)
        job = f"upload {uuid.uuid4()}"
        try:
            with write_markers.marked_writing(real, pool=request.pool,
                                              volume=request.volume_name, job_id=job):
                # Checked with the interlock in place: no domain can start from here on.
                users, holders = await users_of(self.calls, real, request.pool,
                                                request.volume_name)
                reason = usage_refusal(users, holders, shown)
                if reason is not None:
                    raise UploadRefused(409, reason)
                if volume.capacity < request.length:
                    # libvirt never sets a capacity below the allocation, which rounds
                    # up to whole blocks: a 1-byte volume holds 4 KiB.
                    await self.calls.grow_volume(volume.path,
                                                 max(request.length, volume.allocation))
                written = await self._write(real, request.length, body)
                users, holders = await users_of(self.calls, real, request.pool,
                                                request.volume_name)
        except write_markers.VolumeMarked as exc:
            raise UploadRefused(409, str(exc)) from exc
        reason = usage_refusal(users, holders, shown)
        if reason is not None:
            raise Refused(f"{reason}: it was used while being written; its content is "
                                "undefined", touched=True)
        self.log.info("volume content uploaded", pool=request.pool, volume=request.volume_name,
                      bytes=written, path=real)
        return written

    async def _write(self, path: str, length: int, body: AsyncIterator[bytes]) -> int:
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CLOEXEC)
        written = 0
        try:
            pending = bytearray()
            async for chunk in body:
                if written + len(pending) + len(chunk) > length:
                    raise UploadRefused(400,
                                        f"the body is longer than its Content-Length {length}")
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    await asyncio.to_thread(_write_all, fd, written, bytes(pending))
                    written += len(pending)
                    pending.clear()
            if pending:
                await asyncio.to_thread(_write_all, fd, written, bytes(pending))
                written += len(pending)
        finally:
            await asyncio.to_thread(os.close, fd)
        if written != length:
            raise UploadRefused(400, f"the body ended after {written} of "
                                f"{length} bytes; the volume holds a partial upload")
        await asyncio.to_thread(fsync_path, Path(path))
        return written


def _write_all(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view, offset = view[count:], offset + count
