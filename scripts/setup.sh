#!/usr/bin/env bash
# Installs what a fresh Debian 12 host lacks to run and test the watcher:
# Debian packages (libvirt, QEMU, qemu-img, LVM, User-Mode Linux, and prometheus for
# promtool, which tests contrib/prometheus/alerts.yaml) and a virtualenv
# with the project and its dev tools (which bring the SeaweedFS S3 server).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils seabios
      libvirt-dev pkg-config gcc python3-venv python3-dev
      lvm2 thin-provisioning-tools user-mode-linux util-linux kmod e2fsprogs
      prometheus)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing the project into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
# The LVM suite's guest kernel must boot on this CPU (see uml-kernel.sh).
./scripts/uml-kernel.sh
echo "setup: ok"
