#!/usr/bin/env bash
# The one command that runs every check: lint, types, layering, then all tests
# (unit, integration against real services, libvirt end to end, LVM under UML).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/services.sh
.venv/bin/ruff check watcher tests
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/pytest "$@"
