"""The policies in force, loaded at start and again on SIGHUP.

Why it exists: every job reads the policies through ``get`` at the moment it decides, and
a reload must never leave it without any: a reload that fails (a YAML mistake, an
unreadable file) is logged problem by problem and keeps the previous policies running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from watcher import telemetry
from watcher.config import load_policy_dir
from watcher.core.errors import ConfigError
from watcher.core.policy import PolicySet

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
