"""The daemon: one supervisor owning every long-running task.

Why it exists: the watcher is a handful of loops (AMQP consumer, libvirt watcher,
reconcile timer, HTTP server, watchdog) that must start in order, stop in order, and
never leave a half-written volume behind. Signal handlers only set flags; the
supervisor reacts to them:

- SIGTERM/SIGINT: stop taking work, drain running jobs for ``drain_timeout`` seconds
  (shorter than systemd's ``TimeoutStopSec``), cancel what is left, exit.
- SIGHUP: reload policies; a reload that fails keeps the previous policies running.

Each unit of background work (one image warm, one reconcile pass, one domain sweep, one
reprovision) is isolated: an unexpected exception is logged once with its traceback,
counted in ``volume_watcher_unexpected_errors_total{unit}``, and the work is tried again
at the next event or interval. Only a failure of the runtime itself (a root task that
exits) stops the daemon, and systemd then restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watcher import telemetry
from watcher.adapters.amqp import BucketEventConsumer
from watcher.adapters.s3 import S3Store
from watcher.cache import ImageCache
from watcher.config import Config, load_policy_dir
from watcher.core.decide import WarmRequest, plan_warms
from watcher.core.errors import (
    ConfigError,
    ImageRejected,
    NotUploadedYet,
    SidecarUnavailable,
    TemporaryError,
    UnsafeName,
    WatcherError,
)
from watcher.core.events import parse_bucket_notification
from watcher.core.policy import PolicySet
from watcher.core.waiting import wait_any
from watcher.http import HttpServer
from watcher.runtime.coalesce import Coalescer
from watcher.runtime.fleet import FleetMember
from watcher.runtime.observability import context_from_amqp_headers
from watcher.runtime.sdnotify import SystemdNotifier

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from watcher.adapters.hypervisor import DomainWatcher
    from watcher.reprovision import Reprovisioner

log = telemetry.get_logger(component="supervisor")


@dataclass
class PolicyStore:
    """The policies in force; a failed reload keeps the previous ones."""

    directory: Any
    current: PolicySet = field(default_factory=PolicySet)
    loaded: bool = False
    host: str | None = None
    """This host's name, for the policies' ``hosts:`` globs."""

    def load(self) -> bool:
        try:
            policies = load_policy_dir(self.directory)
        except ConfigError as err:
            telemetry.policy_reloads.labels(result="failed").inc()
            for problem in err.problems:
                log.error("policy error", problem=str(problem))
            log.error("policies not loaded; keeping the previous ones" if self.loaded
                      else "policies not loaded", problems=len(err.problems))
            return False
        except Exception:
            telemetry.policy_reloads.labels(result="failed").inc()
            telemetry.report_unexpected(log, "reload", directory=str(self.directory))
            return False
        self.current = policies if self.host is None else policies.on_host(self.host)
        self.loaded = True
        telemetry.policy_reloads.labels(result="ok").inc()
        telemetry.policy_images.set(len(policies.images))
        log.info("policies loaded", images=len(policies.images), rules=len(policies.rules))
        return True

    def get(self) -> PolicySet:
        return self.current


class Daemon:
    """Wires the adapters and jobs together and runs them until told to stop."""

    def __init__(self, config: Config, *, drain_timeout: float = 60.0,
                 with_libvirt: bool = True) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        self.policies = PolicyStore(config.policies.dir, host=config.host.resolved)
        self.s3 = S3Store(config.s3)
        self.cache = ImageCache(
            config.cache.dir, self.s3, max_size=config.cache.max_size,
            max_virtual_size=config.cache.max_virtual_size,
            max_concurrent_downloads=config.cache.max_concurrent_downloads,
            pinned=self.policies.get)
        self.consumer = BucketEventConsumer(
            config.amqp, self.handle_message,
            queue_name=config.amqp.queue_name(config.host.resolved))
        self.domains: DomainWatcher | None = None
        self.reprovisioner: Reprovisioner | None = None
        if with_libvirt:
            from watcher.reprovision import Reprovisioner

            self.reprovisioner = Reprovisioner.create(
                uri=config.libvirt.uri, images=self.cache, policies=self.policies.get,
                volumes=config.volumes, settings=config.reprovision)
            self.domains = self.reprovisioner.hypervisor
        self.http = HttpServer(config.http.listen, self.readiness) if config.http.listen else None
        self.notifier = SystemdNotifier()
        self.stop_requested = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.reconcile_requested = asyncio.Event()
        self.fleet = FleetMember(config, self.cache, self.policies.get, self.stop_requested)
        self._failing_images: set[str] = set()
        """Images whose last warm failed; their next success is logged as a recovery."""
        self._warms = Coalescer()

    # ---- health -----------------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        checks = {"policies": self.policies.loaded, "amqp": self.consumer.consuming}
        if self.domains is not None:
            checks["libvirt"] = self.domains.connected
        return checks

    def status_line(self) -> str:
        entries = len(self.cache.entries())
        jobs = self.reprovisioner.running_jobs if self.reprovisioner else 0
        return f"{entries} images cached, {jobs} jobs running"

    # ---- bucket events ----------------------------------------------------------------

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
        plan = plan_warms(events, self.policies.get())
        if not plan:
            return None
        return self._warm_planned(plan, context_from_amqp_headers(headers))

    async def _warm_planned(self, plan: list[WarmRequest], parent: Context) -> None:
        with telemetry.tracer.start_as_current_span("bucket event", context=parent):
            for request in plan:
                await self.warm(request.image, trigger=request.trigger)

    async def warm(self, image_name: str, *, trigger: str) -> None:
        """Warm one image; bad images are reported, temporary failures raised to the caller.

        Calls for an image that is being warmed share one follow-up run, which starts when
        the current one ends: a burst of duplicate notifications costs two runs, and an
        upload that raced the current run is still seen by the next.
        """
        await self._warms.run(image_name, lambda: self._warm_once(image_name, trigger))

    async def _warm_once(self, image_name: str, trigger: str) -> None:
        image = self.policies.get().images.get(image_name)
        if image is None:
            return
        bound = log.bind(image=image.name, trigger=trigger)
        try:
            entry = await self.fleet.warm(image.name, functools.partial(self.cache.ensure, image))
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

    async def reconcile(self) -> None:
        """Warm every policy image; sweep domains. A missed event costs one interval."""
        started = time.monotonic()
        images = self.policies.get().images_to_keep_warm()
        for image in images:
            # Each warm is its own unit and reports its own failure; the pass goes on.
            with contextlib.suppress(Exception):
                await self.warm(image.name, trigger="reconcile")
        outdated = None
        if self.domains is not None and self.domains.connected:
            try:
                await self.domains.sweep()
                outdated = await self._count_outdated()
            except WatcherError as err:
                log.warning("domain sweep failed; retrying at the next interval", error=str(err))
            except Exception:
                telemetry.report_unexpected(log, "sweep")
        self.cache.evict()
        self.fleet.reconciled(outdated)
        log.info("reconciled", images=len(images),
                 seconds=round(time.monotonic() - started, 3))

    async def _count_outdated(self) -> list[str] | None:
        """Domains provisioned with an older digest than their image's cached current one."""
        from watcher.adapters.hypervisor import domain_overview

        try:
            rows = await asyncio.to_thread(domain_overview, self.config.libvirt.uri,
                                           self.policies.get())
        except WatcherError as err:
            log.warning("could not count outdated domains", error=str(err))
            return None
        outdated = []
        for row in rows:
            current = self.cache.current(str(row.get("image") or ""))
            provisioned = row.get("provisioned_sha256")
            if current is not None and provisioned and provisioned != current.digest:
                outdated.append(str(row["domain"]))
        telemetry.domains_outdated.set(len(outdated))
        return outdated

    # ---- loops ------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        interval = self.config.reconcile_interval
        while not self.stop_requested.is_set():
            try:
                await self.reconcile()
            except Exception:
                telemetry.report_unexpected(log, "reconcile")
            self.reconcile_requested.clear()
            await wait_any(self.stop_requested, self.reconcile_requested, timeout=interval)

    async def _reload_loop(self) -> None:
        while not self.stop_requested.is_set():
            await wait_any(self.stop_requested, self.reload_requested)
            if self.stop_requested.is_set():
                return
            self.reload_requested.clear()
            self.notifier.reloading()
            if self.policies.load():
                self.reconcile_requested.set()
            self.notifier.ready()

    async def _watchdog_loop(self) -> None:
        """Watchdog pings, the STATUS= line and connection gauges, every few seconds."""
        interval = min(self.notifier.watchdog_interval() or 5.0, 5.0)
        while not self.stop_requested.is_set():
            self.notifier.watchdog()
            try:
                self.notifier.status(self.status_line())
            except Exception:
                telemetry.report_unexpected(log, "watchdog")
            telemetry.connection_up.labels(service="amqp").set(int(self.consumer.connected))
            await wait_any(self.stop_requested, timeout=interval)

    async def _ready_when_connected(self) -> None:
        while not self.stop_requested.is_set():
            if all(self.readiness().values()):
                self.notifier.ready()
                self.notifier.status(self.status_line())
                log.info("ready", **self.readiness())
                return
            await wait_any(self.stop_requested, timeout=0.2)

    # ---- life cycle -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)

    async def run(self, *, handle_signals: bool = True) -> int:
        """Run until SIGTERM (or ``stop_requested``); returns the process exit code."""
        if handle_signals:
            self.install_signal_handlers()
        removed = await self.cache.recover()
        if not self.policies.load():
            log.warning("starting without policies; fix them and send SIGHUP",
                        directory=str(self.config.policies.dir))
        if removed:
            log.info("start-up cleanup", removed=removed)
        if self.http is not None:
            await self.http.start()
        await self.consumer.start()
        tasks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "reconcile": self._reconcile_loop,
            "reload": self._reload_loop,
            "watchdog": self._watchdog_loop,
            "ready": self._ready_when_connected,
        }
        if self.config.fleet.status_bucket:
            tasks["fleet-status"] = self.fleet.run
        if self.domains is not None and self.reprovisioner is not None:
            tasks["libvirt"] = lambda: self.domains.run(self.stop_requested)  # type: ignore[union-attr]
            tasks["reprovision"] = lambda: self.reprovisioner.run(self.stop_requested)  # type: ignore[union-attr]
        running = {asyncio.create_task(factory(), name=name): name
                   for name, factory in tasks.items()}
        stopper = asyncio.create_task(self.stop_requested.wait(), name="stop")
        exit_code = 0
        pending: set[asyncio.Task[Any]] = set(running) | {stopper}
        while not self.stop_requested.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if self.stop_requested.is_set():
                break  # tasks that end because we are stopping are not failures
            for task in done:
                name = running.get(task)
                if name is None or name == "ready":
                    continue
                err = task.exception() if not task.cancelled() else None
                log.error("task exited; stopping", task=name, error=repr(err))
                exit_code = 1
                self.stop_requested.set()
        await self._shutdown(running)
        return exit_code

    async def _shutdown(self, running: Mapping[asyncio.Task[Any], str]) -> None:
        log.info("stopping: draining running jobs", deadline=self.drain_timeout)
        self.notifier.stopping()
        await self.consumer.stop(drain_timeout=self.drain_timeout)
        await self._warms.close()
        if self.reprovisioner is not None:
            await self.reprovisioner.drain(self.drain_timeout)
        for task in running:
            if not task.done():
                task.cancel()
        results = await asyncio.wait_for(
            asyncio.gather(*running, return_exceptions=True), timeout=10)
        for (_task, name), result in zip(running.items(), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.warning("task ended with an error during shutdown", task=name,
                            error=repr(result))
        if self.http is not None:
            await self.http.stop()
        log.info("stopped")
