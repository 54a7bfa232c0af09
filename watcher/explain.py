"""``explain DOMAIN``: what a reprovision of one domain would do now, without doing it.

An operator about to tag a domain (or wondering why a tagged one is not written) wants the
job's own reasoning, not a guess: which rule and image, which disk and volume, the
allow-list and size verdicts, and the steps. So this reads the domain as the job does
(``watcher.reprovision.facts`` over a connection of its own), asks the same pure decisions
(``core.domain.decide``, ``core.plan.plan``) and prints their answers. It writes nothing:
the cache is read, not warmed, and a request is assumed where the domain has none. A
domain no rule of this watcher matches is ``unmatched``: the daemon leaves it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from watcher.adapters.hypervisor.jobcalls import DomainCalls
from watcher.adapters.hypervisor.queries import OneShotConnection
from watcher.cache import CacheEntry
from watcher.core.domain import (
    DomainSnapshot,
    DomainState,
    Fail,
    MalformedState,
    RootDiskSource,
    RootDiskUnusable,
    Unmatched,
    Write,
    decide,
    parse_state,
    render_state,
    root_disk,
)
from watcher.core.plan import TargetFacts, plan, volume_refusal
from watcher.core.policy import PolicySet
from watcher.core.steps import ExtendLv, GrowVolume, Plan
from watcher.core.units import format_size
from watcher.reprovision.facts import gather, resolve_target
from watcher.settings import Config


class CurrentImages(Protocol):
    """Where the current version of each image is looked up (the cache store, read-only)."""

    def current(self, image_name: str) -> CacheEntry | None: ...


@dataclass
class Explanation:
    """One domain's answers, in the order an operator reads them."""

    domain: str
    uuid: str = ""
    power: str = ""
    state: str | None = None
    """The watcher's metadata element as it is, or None."""
    rule: str | None = None
    image: str | None = None
    cached: str | None = None
    """The digest the cache holds as the image's current version."""
    disk: str | None = None
    volume: str | None = None
    allowed: str | None = None
    """``allowed``, or the allow-list's refusal."""
    size: str | None = None
    now: str = ""
    """What would happen if the domain were tagged now."""
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unmatched: str | None = None
    """Why no rule of this watcher matches the domain; None when one does."""
    parsed: DomainState | None = field(default=None, repr=False)
    """The state element, parsed (for ``status DOMAIN``)."""

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "parsed"}

    def lines(self) -> list[str]:
        rows = [("domain", f"{self.domain} ({self.uuid})" if self.uuid else self.domain),
                ("power", self.power), ("state", self.state or "none"),
                ("rule", self.rule or "none matches"), ("image", self.image or "-"),
                ("cached", self.cached or "not cached: a job would download it first"),
                ("root disk", self.disk or "-"), ("volume", self.volume or "-"),
                ("allow-list", self.allowed or "-"), ("size", self.size or "-"),
                ("now", self.now)]
        out = [f"{name + ':':<12} {value}" for name, value in rows]
        out += [f"  {number}. {step}" for number, step in enumerate(self.steps, 1)]
        out += [f"note:        {note}" for note in self.notes]
        return out


async def explain(config: Config, policies: PolicySet, store: CurrentImages,
                  name: str) -> Explanation:
    """Read domain ``name`` and decide as a reprovision job would, changing nothing."""
    connection = OneShotConnection(config.libvirt.uri)
    try:
        calls = DomainCalls(connection)
        uuid = await connection.uuid_of(name)
        facts = await calls.describe(uuid)
        answer = Explanation(domain=name, uuid=uuid)
        if facts is None:
            answer.now = "the domain is gone"
            return answer
        answer.domain = facts.name
        answer.power = "shut off" if facts.shut_off else "running or paused"
        try:
            state = parse_state(facts.metadata)
        except MalformedState as exc:
            answer.state = f"malformed: {exc}"
            answer.now = "the watcher ignores this domain until its metadata is fixed"
            return answer
        answer.state = render_state(state) if state is not None else None
        answer.parsed = state
        request = state if state is not None and state.is_request else DomainState("reprovision")
        rule = policies.rule_for(facts.name)
        if rule is not None:
            answer.rule = f"{rule.match} ({rule.origin})" if rule.origin else rule.match
            if rule.hosts:
                answer.rule += f"; hosts {', '.join(rule.hosts)} include {policies.host}"
        elif any(r.matches(facts.name, None) for r in policies.rules):
            answer.notes.append(f"a rule matches {facts.name} on other hosts (hosts:), "
                                f"not on {policies.host}")
        action = decide(DomainSnapshot(facts.name, uuid, True, facts.managed_save, request),
                        policies)
        if isinstance(action, Unmatched):
            answer.unmatched = action.why
            tagged = state is not None and state.is_request
            answer.now = (f"unmatched: {'the' if tagged else 'a'} request is left exactly as it "
                          f"is, by this watcher: {action.why}")
            return answer
        if isinstance(action, Fail):
            answer.image = action.image
            answer.now = f"a request would fail: {action.reason}"
            return answer
        assert isinstance(action, Write)
        answer.image = action.image
        entry = store.current(action.image)
        answer.cached = entry.digest if entry is not None else None
        if entry is None:
            await _describe_volume(answer, calls, facts.xml, action, config)
            answer.now = "a request would download the image, then decide as below"
            return answer
        job = await gather(calls, facts, request, action.rule, action.image, entry,
                           config.volumes)
        if job.disk is not None:
            answer.disk = _disk_text(job.disk)
        _describe_target(answer, job.target, config, job.disk_problem)
        verdict = plan(job, action.rule, config.volumes)
        if isinstance(verdict, Plan):
            answer.steps = verdict.describe()
            answer.notes = list(verdict.notes)
            answer.now = _when(facts.shut_off, state, "write the image in these steps")
            answer.size = _fit(verdict, entry.virtual_size, answer.size)
        else:
            answer.now = f"a request would fail: {verdict.reason}"
        return answer
    finally:
        await connection.close()


def _when(shut_off: bool, state: DomainState | None, what: str) -> str:
    pending = state is not None and state.is_request
    if not shut_off:
        return f"it runs: {'the request waits' if pending else 'a request would wait'} " \
               f"until it is shut off, then {what}"
    return f"{'the request would' if pending else 'a request would'} {what}"


def _fit(verdict: Plan, virtual_size: int, holds: str | None) -> str:
    grows = any(isinstance(step, GrowVolume | ExtendLv) for step in verdict.steps)
    return "; ".join(part for part in (
        holds, f"the image needs {format_size(virtual_size)}",
        "the volume is grown first" if grows else "it fits") if part)


async def _describe_volume(answer: Explanation, calls: DomainCalls, xml: str, action: Write,
                           config: Config) -> None:
    """Disk, volume and allow-list, when there is no image yet to plan with."""
    try:
        disk = root_disk(xml, action.rule.root_disk)
    except RootDiskUnusable as exc:
        answer.disk = str(exc)
        return
    answer.disk = _disk_text(disk)
    target = await resolve_target(calls, disk)
    _describe_target(answer, target, config, None)


def _describe_target(answer: Explanation, target: TargetFacts | None, config: Config,
                     problem: str | None) -> None:
    if problem is not None:
        answer.disk = problem
    if target is None:
        return
    answer.volume = target.shown
    refusal = volume_refusal(target, config.volumes)
    answer.allowed = "allowed" if refusal is None else f"refused: {refusal}"
    capacity = target.capacity
    if capacity is not None:
        answer.size = f"the volume holds {format_size(capacity)}"


def _disk_text(disk: RootDiskSource) -> str:
    where = disk.path or f"pool {disk.pool}, volume {disk.volume}"
    return f"{disk.target}: {disk.type} {where}"
