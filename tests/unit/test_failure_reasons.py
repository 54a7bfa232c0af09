"""Every way a reprovision ends ``failed`` says why: a reason in the metadata and one
warning line with the domain, the rule and the step. The job runs here against a fake
hypervisor and cache over a plain file; the integration tests run the real ones."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from watcher.adapters import write_markers
from watcher.adapters.hypervisor import DomainFacts
from watcher.cache import CacheEntry
from watcher.core.domain import DomainState, render_state
from watcher.core.errors import PermanentError, PermanentImageWriteError
from watcher.core.failure import FAILURE_STEPS, failure_reason, rule_fields
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.reprovision import Reprovisioner

MiB = 1 << 20
DIGEST = "ef" * 32
RULES = (DomainRule("db-*", "v1", origin="10-db.yaml:4"),
         DomainRule("web-*", "v2", origin="20-web.yaml:7"))
POLICIES = PolicySet(images={name: ImageSpec(name, "b", f"{name}.qcow2", None, "qcow2")
                             for name in ("v1", "v2")}, rules=RULES)


def domain_xml(path: Path, disk_format: str = "raw") -> str:
    return (f"<domain><name>web-1</name><devices><disk type='file' device='disk'>"
            f"<driver name='qemu' type='{disk_format}'/><source file='{path}'/>"
            "<target dev='vda'/></disk></devices></domain>")


class Volumes:
    def __init__(self, root: Path) -> None:
        self.allow = (f"{root}/*",)
        self.lvm_vgs: tuple[str, ...] = ()


@dataclass
class Log:
    lines: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def bind(self, **fields: Any) -> Log:
        return self

    def _say(self, level: str) -> Callable[..., None]:
        return lambda message, **fields: self.lines.append((level, message, fields))

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level in ("debug", "info", "warning", "error"):
            return self._say(level)
        raise AttributeError(level)

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return [fields for level, _message, fields in self.lines if level == "warning"]


class Hypervisor:
    """The calls a job makes, over one domain whose root disk is a plain file."""

    connected = True

    def __init__(self, facts: DomainFacts) -> None:
        self.facts = facts
        self.states: list[DomainState] = []
        self.record_error: PermanentError | None = None
        self.started_during_write = False

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        yield

    async def describe(self, uuid: str) -> DomainFacts:
        return self.facts

    async def set_state(self, uuid: str, state: DomainState) -> None:
        if self.record_error is not None and state.kind == "provisioned":
            raise self.record_error
        self.states.append(state)

    async def is_shut_off(self, uuid: str) -> bool:
        return not (self.started_during_write and any(
            s.kind == "provisioning" for s in self.states) and self._written)

    _written = False

    async def volume_path(self, pool: str, volume: str) -> str:
        raise AssertionError("file disks only")

    async def volume_for_path(self, path: str) -> None:
        return None

    async def start(self, uuid: str) -> None:
        pass


class Images:
    def __init__(self, path: Path, error: PermanentError | None = None) -> None:
        self.entry = CacheEntry(DIGEST, path, "qcow2", 4 * MiB, 1 * MiB, "v2", "b",
                                "v2.qcow2", "etag")
        self.error = error

    async def ensure(self, image: ImageSpec) -> CacheEntry:
        if self.error is not None:
            raise self.error
        return self.entry

    def current(self, image_name: str) -> CacheEntry | None:
        return self.entry

    async def durable(self, entry: CacheEntry) -> CacheEntry:
        return entry


@dataclass
class Case:
    step: str
    reason: str
    """A part of the recorded reason."""
    disk_format: str = "raw"
    disk_size: int = 8 * MiB
    managed_save: bool = False
    requested_image: str | None = None
    fetch_error: PermanentError | None = None
    write_error: Exception | None = None
    record_error: PermanentError | None = None
    started_during_write: bool = False


CASES = {
    "managed-save": Case("check", "managed-save image", managed_save=True),
    "unknown-image": Case("resolve", "'arch' is not defined", requested_image="arch"),
    "image-refused": Case("fetch", "checksum mismatch",
                          fetch_error=PermanentError("checksum mismatch")),
    "plan-refuses-a-qcow2-disk": Case("check", "only raw volumes", disk_format="qcow2"),
    "plan-refuses-a-small-volume": Case("check", "grow: false", disk_size=1 * MiB),
    "write-fails": Case("write", "disk on fire", write_error=PermanentImageWriteError(
        "/dev/x", 1, "disk on fire")),
    "started-during-write": Case("check", "started while its volume was being written",
                                 started_during_write=True),
    "recording-the-result-fails": Case("record", "metadata write refused",
                                       record_error=PermanentError("metadata write refused")),
    "an-error-without-a-message": Case("write", "without a message",
                                       write_error=PermanentError("")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_every_failure_records_a_reason_and_one_warning_naming_rule_and_step(
        case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "root.img"
    disk.write_bytes(b"\0" * case.disk_size)
    request = DomainState("reprovision", image=case.requested_image)
    hypervisor = Hypervisor(DomainFacts("uuid-1", "web-1", True, case.managed_save,
                                        render_state(request), domain_xml(disk, case.disk_format)))
    hypervisor.record_error = case.record_error
    hypervisor.started_during_write = case.started_during_write
    monkeypatch.setattr(write_markers, "marked_writing",
                        lambda *args, **kwargs: contextlib.nullcontext())

    async def write_image(source: Path, source_format: str, target: Path, **_: Any) -> None:
        hypervisor._written = True
        if case.write_error is not None:
            raise case.write_error

    log = Log()
    job = Reprovisioner(hypervisor, Images(tmp_path / "image"),  # type: ignore[arg-type]
                        lambda: POLICIES, Volumes(tmp_path), log, write_image=write_image)
    job.cache = Images(tmp_path / "image", case.fetch_error)
    await job("uuid-1")

    final = hypervisor.states[-1]
    assert final.kind == "failed", hypervisor.states
    assert final.reason and case.reason in final.reason, final.reason
    [warning] = log.warnings
    assert warning["result"] == "failed" and warning["domain"] == "web-1"
    assert (warning["rule"], warning["rule_index"], warning["rule_origin"]) == (
        "web-*", 1, "20-web.yaml:7")
    assert warning["step"] == case.step and case.step in FAILURE_STEPS
    assert warning["reason"] == final.reason


def test_a_failure_reason_is_one_line_and_never_empty() -> None:
    assert failure_reason("  two\n lines ", "write", "OSError") == "two lines"
    assert failure_reason("", "record", "HypervisorError") == (
        "the record step failed (HypervisorError, without a message)")


def test_a_rule_is_named_by_its_glob_its_place_and_its_origin() -> None:
    assert rule_fields(POLICIES, RULES[0]) == {
        "rule": "db-*", "rule_index": 0, "rule_origin": "10-db.yaml:4"}
    copy = DomainRule("web-*", "v2", origin="20-web.yaml:7")
    assert rule_fields(POLICIES, copy)["rule_index"] == 1


async def test_an_unmatched_request_is_never_written_and_said_once(tmp_path: Path) -> None:
    facts = DomainFacts("uuid-9", "other-1", True, True, render_state(DomainState("reprovision")),
                        domain_xml(tmp_path / "root.img"))
    hypervisor = Hypervisor(facts)
    log = Log()
    job = Reprovisioner(hypervisor, Images(tmp_path / "image"),  # type: ignore[arg-type]
                        lambda: POLICIES, Volumes(tmp_path), log)
    for _ in range(3):  # its tag's event, a stop, a sweep
        await job("uuid-9")
    assert hypervisor.states == []
    said = [fields for level, message, fields in log.lines
            if message == "tagged domain left as it is: unmatched"]
    assert [(s["domain"], s["state"]) for s in said] == [("other-1", "reprovision")]
    assert log.warnings == []
