"""The daemon: one supervisor owning every long-running task.

Why it exists: the watcher is a handful of loops (AMQP consumer, libvirt watcher,
reconcile timer, HTTP server, watchdog) that must start in order, stop in order, and
never leave a half-written volume behind. Signal handlers only set flags; the
supervisor reacts to them:

- SIGTERM/SIGINT: stop taking work, drain the consumer, the warms and the reprovisions
  against one deadline (``drain_timeout``, 75 s: below the unit's ``TimeoutStopSec=90``),
  cancel what is left, and log one ``stopped`` line naming whatever was still running.
- SIGHUP: reload policies and the API's tokens; a reload that fails keeps the previous
  ones running. The config file is read again for its log level (``log.level``), applied
  at once; everything else in it is read once, at start: a SIGHUP after any other setting
  changed on disk logs a warning that only a restart applies it.

Each unit of background work (one image warm, one reconcile pass, one domain sweep, one
reprovision) is isolated: an unexpected exception is logged once with its traceback,
counted in ``volume_watcher_unexpected_errors_total{unit}``, and the work is tried again
at the next event or interval. Only a failure of the runtime itself (a root task that
exits) stops the daemon, and systemd then restarts it.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from watcher import telemetry
from watcher.adapters import write_markers
from watcher.adapters.amqp import BucketEventConsumer
from watcher.adapters.jobstore import JobStore
from watcher.adapters.s3 import S3Store
from watcher.cache import Cache
from watcher.config import load_config
from watcher.core.errors import ConfigError, WatcherError
from watcher.core.triage import count_by_state, is_outdated, listed_state
from watcher.core.waiting import wait_any
from watcher.fleet import FleetMember
from watcher.http import HttpServer
from watcher.http.api import ApiServer
from watcher.http.job_routes import JobRoutes
from watcher.http.probes import Health
from watcher.jobs import ApiJobs
from watcher.jobs.service import RETRY as API_JOB_RETRY
from watcher.jobs.upload import Uploader
from watcher.prewarm import Prewarmer
from watcher.runtime.coalesce import Coalescer
from watcher.runtime.keyed import KeyedWorker
from watcher.runtime.observability import context_from_amqp_headers, set_log_level
from watcher.runtime.policies import PolicyStore
from watcher.runtime.sdnotify import SystemdNotifier
from watcher.settings import RUNTIME_TUNING, Config

if TYPE_CHECKING:
    from watcher.adapters.hypervisor import DomainWatcher
    from watcher.reprovision import Reprovisioner

log = telemetry.get_logger(component="supervisor")

STOP_DEADLINE = RUNTIME_TUNING.stop_deadline
"""Seconds from SIGTERM to exit, all drains together (``watcher.settings.RuntimeTuning``)."""


class StopDeadline:
    """One deadline shared by every drain; the last part of it is kept for cancelling."""

    def __init__(self, total: float) -> None:
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.started = loop.time()
        self.end = self.started + total
        self.drains_end = self.end - min(5.0, total / 5)

    def for_drains(self) -> float:
        return max(0.0, self.drains_end - self._clock())

    def drains_over(self) -> bool:
        return self._clock() >= self.drains_end

    def remaining(self) -> float:
        return max(0.0, self.end - self._clock())

    def elapsed(self) -> float:
        return self._clock() - self.started


JOB_DATABASE = "jobs.sqlite3"
"""The API's job database, in ``state.dir``."""


class Daemon:
    """Wires the adapters and jobs together and runs them until told to stop."""

    def __init__(self, config: Config, *, drain_timeout: float = STOP_DEADLINE,
                 with_libvirt: bool = True) -> None:
        self.config = config
        self.drain_timeout = drain_timeout
        """Seconds the whole stop may take (every drain shares them)."""
        self.policies = PolicyStore(config.policies.dir, host=config.host.resolved)
        self.s3 = S3Store(config.s3)
        # To jobs the cache hands out current images, fetching them if need be.
        self.cache = Cache(
            config.cache.dir, self.s3, max_size=config.cache.max_size,
            max_virtual_size=config.cache.max_virtual_size,
            max_concurrent_downloads=config.cache.max_concurrent_downloads,
            policies=self.policies.get, stale_sidecar_hold=config.cache.stale_sidecar_hold)
        self.stop_requested = asyncio.Event()
        self.fleet = FleetMember(config, self.cache, self.policies.get, self.stop_requested)
        self._warms = Coalescer()
        self.prewarm = Prewarmer(self.cache, self.policies.get, self._warms,
                                 context_from_amqp_headers, self.fleet)
        self.consumer = BucketEventConsumer(
            config.amqp, self.handle_message,
            queue_name=config.amqp.queue_name(config.host.resolved))
        self.domains: DomainWatcher | None = None
        # Volume writes at once, API jobs and reprovisions together (reprovision.max_concurrent).
        self._write_slots = asyncio.Semaphore(max(1, config.reprovision.max_concurrent))
        self.reprovisioner: Reprovisioner | None = None
        self.reprovisions: KeyedWorker[str] | None = None
        if with_libvirt:
            from watcher.adapters.hypervisor import DomainWatcher
            from watcher.reprovision import RETRY_BACKOFF, Reprovisioner

            self.domains = DomainWatcher(config.libvirt.uri, self._domain_reported)
            self.reprovisioner = Reprovisioner(
                self.domains, self.cache, self.policies.get, config.volumes)
            # Golden LVs of the clone path: made when an image warms, gone with its entry.
            self.prewarm.after_warm = self.reprovisioner.prepare_goldens
            self.cache.on_evicted = self.reprovisioner.remove_goldens
            self.reprovisions = KeyedWorker(
                self.reprovisioner, unit="reprovision", key_field="uuid",
                max_concurrent=config.reprovision.max_concurrent, retry=RETRY_BACKOFF,
                slots=self._write_slots)
        health = Health(self.readiness)  # both listeners' /healthz: one uptime, one verdict
        self.http = (HttpServer(config.http.listen, self.readiness, health=health)
                     if config.http.listen else None)
        self.api = ApiServer(config.api, health=health) if config.api.listen else None
        self.api_jobs: ApiJobs | None = None
        """The API's jobs; made at start, once the job database is open."""
        self.api_worker: KeyedWorker[str] | None = None
        if self.api is not None and self.domains is not None:
            # One engine for both kinds of job: the same worker type and the same slots; the
            # engine's retry is the jobs' own, so a job's last attempt is its last retry.
            self.api_worker = KeyedWorker(
                self._process_api_key, unit="api", key_field="key",
                max_concurrent=config.reprovision.max_concurrent, retry=API_JOB_RETRY,
                slots=self._write_slots)
        self.notifier = SystemdNotifier()
        self.reload_requested = asyncio.Event()
        self.reconcile_requested = asyncio.Event()
        self.reconciles = 0
        """Reconcile passes finished since start."""

    async def _process_api_key(self, key: str) -> None:
        assert self.api_jobs is not None
        await self.api_jobs.process(key)

    def _open_api_jobs(self) -> None:
        """Open the job database, add the job routes, queue unfinished jobs again."""
        assert self.api is not None and self.domains is not None and self.api_worker is not None
        directory = self.config.state.dir
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        store = JobStore(directory / JOB_DATABASE)
        self.api_jobs = ApiJobs(store, self.cache, self.domains, self.config.api.pool,
                                self.api_worker.submit)
        routes = JobRoutes(self.api_jobs, self.cache, Uploader(self.domains),
                           self.config.s3.endpoint, lambda: set(self.policies.get().images))
        self.api.add_routes(routes.routes())
        resumed = self.api_jobs.resume()
        if resumed:
            log.info("unfinished api jobs queued again", jobs=resumed)

    def _domain_reported(self, uuid: str) -> None:
        if self.reprovisions is not None:
            self.reprovisions.submit(uuid)

    # ---- health -----------------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        checks = {"policies": self.policies.loaded, "amqp": self.consumer.consuming}
        if self.domains is not None:
            checks["libvirt"] = self.domains.connected
        return checks

    def status_line(self) -> str:
        entries = self.cache.count  # kept in memory: no record is read
        jobs = self.reprovisioner.running_jobs if self.reprovisioner else 0
        jobs += self.api_jobs.running if self.api_jobs else 0
        return f"{entries} images cached, {jobs} jobs running"

    # ---- bucket events ----------------------------------------------------------------

    def handle_message(
        self, body: bytes, headers: Mapping[str, object],
    ) -> Coroutine[Any, Any, None] | None:
        """The consumer's handler: the pre-warm job's triage (see ``Prewarmer``)."""
        return self.prewarm.handle_message(body, headers)

    async def reconcile(self) -> None:
        """Warm every policy image; sweep domains. A missed event costs one interval."""
        started = time.monotonic()
        images = await self.prewarm.warm_all(trigger="reconcile")
        outdated = None
        if self.domains is not None and self.domains.connected:
            try:
                await self.domains.sweep()
                outdated = await self._count_outdated()
            except WatcherError as err:
                log.warning("domain sweep failed; retrying at the next interval", error=str(err))
            except Exception:
                telemetry.report_unexpected(log, "sweep")
        await self.cache.evict()
        if self.reprovisioner is not None:  # also the goldens of entries another process removed
            await self.reprovisioner.remove_orphan_goldens(
                {entry.digest for entry in self.cache.entries()})
        self.fleet.reconciled(outdated)
        self.reconciles += 1
        log.info("reconciled", images=images,
                 seconds=round(time.monotonic() - started, 3))

    async def _count_outdated(self) -> list[str] | None:
        """Domains provisioned with an older digest than their image's cached current one.

        The same rows also set the domains-by-state gauge. Read on the live event
        connection; the caller checked that it is up.
        """
        assert self.domains is not None
        policies = self.policies.get()
        try:  # every domain: a tagged one no rule matches is counted as unmatched
            rows = await self.domains.domain_overview(lambda name: True)
        except WatcherError as err:
            log.warning("could not count outdated domains", error=str(err))
            return None
        outdated = []
        for row in rows:
            rule = policies.rule_for(row.domain)
            current = self.cache.current(rule.image) if rule is not None else None
            if is_outdated(row.provisioned_sha256, current.digest if current else None):
                outdated.append(row.domain)
        telemetry.domains_outdated.set(len(outdated))
        listed = (listed_state(row.domain, row.state, policies) for row in rows)
        states = count_by_state((s for s in listed if s), telemetry.DOMAIN_STATES)
        for state, count in states.items():
            telemetry.domains.labels(state=state).set(count)
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
            self._reread_config()
            if self.api is not None:
                self.api.reload_tokens()
            if self.policies.load():
                self.reconcile_requested.set()
            self.notifier.ready()

    def _reread_config(self) -> None:
        """Apply the config file's log level; warn when any other setting changed on disk."""
        source = self.config.source
        if source is None:
            return
        try:
            now = load_config(source)
        except ConfigError as exc:
            log.warning("the config file is not valid now; nothing of it applied",
                        path=str(source), problems=len(exc.problems))
            return
        if now.log.level is not None and set_log_level(now.log.level):
            log.warning("log level changed", new_level=now.log.level, path=str(source))
        if replace(now, log=self.config.log) != self.config:
            log.warning("the config file changed since start; SIGHUP applies only its log "
                        "level (and reloads the policies): restart the service to apply the "
                        "rest", path=str(source))

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

    async def _cache_refresh_loop(self) -> None:
        """Follow other processes' changes to the cache (``cache prune``); expire held downloads."""
        while not self.stop_requested.is_set():
            await wait_any(self.stop_requested, timeout=5.0)
            try:
                await self.cache.refreshed()
                await self.cache.sweep_held()
            except Exception:
                telemetry.report_unexpected(log, "watchdog")

    async def _ready_when_connected(self) -> None:
        while not self.stop_requested.is_set():
            if all(self.readiness().values()):
                # What start-up made (modules, policies, clients, the cache index) lives as
                # long as the process: collected once, then no longer scanned. Full
                # collections went from ~58 ms (a loop stall) to ~1 ms at 5,000
                # notifications/s (bench/RESULTS.md).
                gc.collect()
                gc.freeze()
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
        stale = await asyncio.to_thread(write_markers.stale_markers_removed)
        if stale:
            log.info("write markers of stopped processes removed", markers=stale)
        if not self.policies.load():
            log.warning("starting without policies; fix them and send SIGHUP",
                        directory=str(self.config.policies.dir))
        if removed:
            log.info("start-up cleanup", removed=removed)
        if self.http is not None:
            await self.http.start()
        if self.api is not None:
            if self.api_worker is not None:
                self._open_api_jobs()
            else:
                log.warning("the API serves no jobs: it needs libvirt")
            await self.api.start()
        await self.consumer.start()
        # Not 0 before the first message: a stale-consumer alert must not fire at every start.
        telemetry.last_amqp_message.set(time.time())
        tasks: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "reconcile": self._reconcile_loop,
            "reload": self._reload_loop,
            "watchdog": self._watchdog_loop,
            "cache-refresh": self._cache_refresh_loop,
            "ready": self._ready_when_connected,
        }
        if self.fleet.publishes:
            tasks["fleet-status"] = self.fleet.run
        if self.domains is not None and self.reprovisions is not None:
            tasks["libvirt"] = lambda: self.domains.run(self.stop_requested)  # type: ignore[union-attr]
            tasks["reprovision"] = lambda: self.reprovisions.run(self.stop_requested)  # type: ignore[union-attr]
        if self.api_jobs is not None and self.api_worker is not None:
            tasks["api-jobs"] = lambda: self.api_worker.run(self.stop_requested)  # type: ignore[union-attr]
            tasks["api-prune"] = lambda: self.api_jobs.run(self.stop_requested)  # type: ignore[union-attr]
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
        """Drain everything against one deadline; one ``stopped`` line names what was left."""
        deadline = StopDeadline(self.drain_timeout)
        log.info("stopping: draining running jobs", deadline=self.drain_timeout)
        self.notifier.stopping()
        if self.api is not None:
            await self.api.stop()  # first: take no more work (HttpTuning.stop_timeout at most)
        still_running: list[str] = []
        handlers = self.consumer.messages_in_flight
        await self.consumer.stop(drain_timeout=deadline.for_drains())
        if handlers and deadline.drains_over():
            still_running.append(f"amqp handlers ({handlers})")
        still_running += [f"warm {image}" for image in await self._warms.drain(
            deadline.for_drains())]
        await self.cache.close()  # downloads end now; a job waiting for one resumes later
        writers = [(name, worker) for name, worker in
                   (("reprovision", self.reprovisions), ("api job", self.api_worker))
                   if worker is not None]
        drained = await asyncio.gather(*(worker.drain(deadline.for_drains())
                                         for _, worker in writers))
        for (name, _), keys in zip(writers, drained, strict=True):
            still_running += [f"{name} {key}" for key in keys]
        for task in running:
            if not task.done():
                task.cancel()
        if running:
            _done, stuck = await asyncio.wait(running, timeout=deadline.remaining())
            still_running += [f"task {running[task]}" for task in stuck]
        for task, name in running.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.warning("task ended with an error during shutdown", task=name,
                            error=repr(task.exception()))
        self.cache.release()
        if self.api_jobs is not None:
            self.api_jobs.store.close()
        if self.http is not None:
            await self.http.stop()
        gc.unfreeze()  # what readiness froze may be collected again (a daemon in a test)
        summary = log.warning if still_running else log.info
        summary("stopped", seconds=round(deadline.elapsed(), 3), deadline=self.drain_timeout,
                still_running=still_running)
