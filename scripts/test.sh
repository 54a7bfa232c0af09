#!/usr/bin/env bash
# The one command that runs every check: lint, types, layering, then all tests —
# unit, integration against real services, libvirt end to end on the host, the Debian
# package's install, upgrade and purge, and the LVM suite inside a User-Mode Linux guest (this kernel has no device-mapper).
# Arguments are passed to the host pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install-hook.sh
./scripts/services.sh
.venv/bin/ruff check watcher tests bench testsupport
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/pytest -m "not lvm" "$@"
# The Debian package: build, install, upgrade, remove and purge on this machine.
./tests/packaging/test-deb.sh
./tests/systemd/test-unit.sh   # the installed package under systemd as PID 1, in a UML guest
exec ./scripts/test-lvm.sh
