#!/usr/bin/env bash
# The one command that runs the whole thing for real on this machine: installs what is
# missing, starts libvirtd, RabbitMQ and the S3 server on loopback, then runs the full
# cycle (upload -> pre-warm -> tag -> rewrite -> boot) with the real daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install-hook.sh
eval "$(./scripts/services.sh --env | sed 's/^/export /')"
exec .venv/bin/python scripts/demo.py "$@"
