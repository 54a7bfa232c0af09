"""Pre-warming: bucket notifications and reconcile passes turned into image warms.

Why it exists: this is the job that runs on every AMQP message, so it decides quickly
(most notifications name objects no policy refers to: counted, acked, nothing more),
runs the warms that remain one image at a time with duplicates coalesced, and reports
each image's failures once when they start and once when they recover. The runtime
builds its parts (the cache, the coalescer, the trace-context reader, this host's
``FleetMember``, which spreads downloads and tracks the status) and passes them in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from watcher import telemetry
from watcher.cache import Cache, CacheEntry
from watcher.core.errors import (
    ImageRejected,
    NotUploadedYet,
    SidecarUnavailable,
    TemporaryError,
    UnsafeName,
)
from watcher.core.events import parse_bucket_notification
from watcher.core.policy import PolicySet
from watcher.core.triage import WarmRequest, plan_warms
from watcher.fleet import FleetMember

if TYPE_CHECKING:
    from opentelemetry.context import Context

T = TypeVar("T")
log = telemetry.get_logger(component="prewarm")


class Coalescing(Protocol):
    """Runs work per key, one at a time, with waiting callers sharing one follow-up run."""

    def run(self, key: str, start: Callable[[], Awaitable[T]]) -> Awaitable[T]: ...


class Prewarmer:
    """Keeps policy images warm on notifications and reconcile passes."""

    def __init__(self, cache: Cache, policies: Callable[[], PolicySet],
                 coalescer: Coalescing,
                 trace_parent: Callable[[Mapping[str, object]], Context],
                 fleet: FleetMember) -> None:
        self.cache = cache
        self.fleet = fleet
        self._policies = policies
        self._coalescer = coalescer
        self._trace_parent = trace_parent
        self._failing_images: set[str] = set()
        """Images whose last warm failed; their next success is logged as a recovery."""
        self.after_warm: Callable[[str, CacheEntry], Awaitable[object]] | None = None
        """Awaited after each successful warm (the reprovisioner makes golden LVs there);
        its failure is logged and does not fail the warm."""

    def handle_message(
        self, body: bytes, headers: Mapping[str, object],
    ) -> Coroutine[Any, Any, None] | None:
        """Triage one AMQP message at once; return the warming to run, or None if there is none.

        Most notifications name objects no policy refers to. They are counted and acked
        here, without a task or a span. Raising (``MalformedEvent``) dead-letters the message.
        """
        telemetry.last_amqp_message.set(time.time())
        events = parse_bucket_notification(body)
        for event in events:
            telemetry.events_received.labels(source="amqp", type=event.event_name).inc()
        plan = plan_warms(events, self._policies())
        if not plan:
            return None
        return self._warm_planned(plan, self._trace_parent(headers))

    async def _warm_planned(self, plan: list[WarmRequest], parent: Context) -> None:
        with telemetry.tracer.start_as_current_span("bucket event", context=parent):
            for request in plan:
                await self.warm(request.image, trigger=request.trigger)

    async def warm_all(self, *, trigger: str) -> int:
        """Warm every image the policies keep warm; each failure is its own unit, reported
        by ``warm``, and the pass goes on. Returns the number of images."""
        images = self._policies().images_to_keep_warm()
        for image in images:
            with contextlib.suppress(Exception):
                await self.warm(image.name, trigger=trigger)
        return len(images)

    async def warm(self, image_name: str, *, trigger: str) -> None:
        """Warm one image; bad images are reported, temporary failures raised to the caller.

        Calls for an image that is being warmed share one follow-up run, which starts when
        the current one ends: a burst of duplicate notifications costs two runs, and an
        upload that raced the current run is still seen by the next.
        """
        await self._coalescer.run(image_name, lambda: self._warm_once(image_name, trigger))

    async def _warm_once(self, image_name: str, trigger: str) -> None:
        image = self._policies().images.get(image_name)
        if image is None:
            return
        bound = log.bind(image=image.name, trigger=trigger)
        try:
            entry = await self.fleet.warm(image.name, lambda before: self.cache.ensure(
                image, before_download=before, durable=False))
        except NotUploadedYet as err:
            # Either object may come first; the missing one's own event retriggers.
            what = "the checksum sidecar" if isinstance(err, SidecarUnavailable) else "the image"
            bound.info(f"waiting for {what}", detail=str(err))
            return
        except ImageRejected:
            self._failing_images.add(image.name)  # the cache logged it, with the object
            return
        except UnsafeName as err:
            self._failing_images.add(image.name)
            bound.warning("image refused", reason="unsafe_name", error=str(err))
            return
        except TemporaryError:
            self._failing_images.add(image.name)  # the cache logged the download failure
            raise
        except Exception:
            self._failing_images.add(image.name)
            telemetry.report_unexpected(bound, "warm", trigger=trigger)
            raise
        if image.name in self._failing_images:
            self._failing_images.discard(image.name)
            bound.info("image warm again", digest=entry.digest, recovered=True)
        bound.debug("image warm", digest=entry.digest)
        if self.after_warm is not None:
            try:
                await self.after_warm(image.name, entry)
            except Exception as err:  # the image is warm; the next warm tries again
                bound.warning("preparing golden lvs failed", digest=entry.digest,
                              error=f"{type(err).__name__}: {err}")
