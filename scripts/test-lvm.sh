#!/usr/bin/env bash
# Runs the LVM test suite (tests/lvm) on real device-mapper inside a User-Mode Linux guest
# (scripts/uml-run) and exits with pytest's exit code. Extra arguments go to pytest.
# Needs the Debian packages user-mode-linux, lvm2 and thin-provisioning-tools and the
# .venv, both provided by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/pytest ] || { echo "test-lvm: no .venv; run scripts/setup.sh first" >&2; exit 2; }

# The source tree is read-only inside the guest: no bytecode, no pytest cache, and
# pytest's temporary files in a directory of our own under the host's /tmp.
work=$(mktemp -d /tmp/lvw-lvm-tests.XXXXXX)
trap 'rm -rf "$work"' EXIT
export PYTHONDONTWRITEBYTECODE=1

rc=0
./scripts/uml-run -t "${LVM_TEST_TIMEOUT:-1800}" -m "${LVM_TEST_MEMORY:-1G}" -- \
  .venv/bin/pytest -m lvm tests/lvm --color=no -p no:cacheprovider \
  --basetemp="$work/pytest" "$@" || rc=$?
exit "$rc"
