#!/usr/bin/env bash
# The installed Debian package under a real systemd: systemd/libvirt-volume-watcher.service
# is otherwise only checked statically (systemd-analyze), because nothing on this machine
# runs systemd as PID 1. This boots the host's own systemd as init in a User-Mode Linux
# guest (scripts/uml-run -s: a throw-away writable overlay over the host's /), and there
# tests/systemd/in-guest.sh installs the package with dpkg -i and drives the service with
# systemctl: READY, reload, stop, the watchdog, journal priorities, and LVM and qemu-img
# under the unit's sandbox.
#
# What the guest has: no network to this host, so the broker is a RabbitMQ of its own
# (this host's rabbitmq-server package, with an empty database) and libvirt is libvirt's
# in-process test driver (test:///default); S3 is not reachable and not needed to become
# ready. udev is installed in the guest from its .deb (apt's cache, else apt-get download)
# so that device-mapper nodes appear as on a real host.
#
# Environment: LVW_DEB (a built .deb; default: scripts/build-deb.sh builds one),
# LVW_SYSTEMD_TIMEOUT (seconds the guest may run, default 600: the whole run takes 130-270 s
# on a quiet 2-core machine and more on a slower one).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'test-systemd: %s\n' "$*"; }
started=$(date +%s)

deb=${LVW_DEB:-}
if [ -z "$deb" ]; then
  deb=$(./scripts/build-deb.sh)
fi
deb=$(realpath "$deb")

udev=$(ls /var/cache/apt/archives/udev_*.deb 2>/dev/null | tail -n 1 || true)
if [ -z "$udev" ]; then
  mkdir -p build/systemd
  (cd build/systemd && apt-get download -qq udev)
  udev=$(ls "$PWD"/build/systemd/udev_*.deb | tail -n 1)
fi
say "package $(basename "$deb"), $(basename "$udev"); booting systemd in the guest"

rc=0
./scripts/uml-run -s -m 1536M -t "${LVW_SYSTEMD_TIMEOUT:-600}" -- \
  tests/systemd/in-guest.sh "$deb" "$udev" || rc=$?
say "$([ "$rc" = 0 ] && echo ok || echo "FAIL (exit $rc)") in $(( $(date +%s) - started )) s"
exit "$rc"
