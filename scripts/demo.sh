#!/usr/bin/env bash
# The one command that runs the whole thing for real on this machine: installs what is
# missing, starts libvirtd, RabbitMQ and the S3 server on loopback if they are not running,
# then runs the full cycle (upload -> pre-warm -> tag -> rewrite -> boot) with the real
# daemon. It removes what it created and leaves the services running.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/install-hook.sh
# An assignment, unlike eval "$(...)", stops the script when services.sh fails.
s3_env=$(./scripts/services.sh --env)
set -a  # export the S3 endpoint and keys for demo.py
eval "$s3_env"
set +a
exec .venv/bin/python scripts/demo.py "$@"
