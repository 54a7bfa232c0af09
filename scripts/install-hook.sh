#!/usr/bin/env bash
# Installs the start interlock (watcher/libvirt_hook.py) as a libvirt qemu hook:
# /etc/libvirt/hooks/qemu.d/libvirt-volume-watcher, executable, run by /usr/bin/python3 -IS
# (isolated, no site: the system Python's standard library only, started fast).
# libvirtd reads the hook directory only when it starts, so a new or changed hook is
# followed by a restart: through systemctl when systemd runs (virtqemud on a host with
# modular daemons, else libvirtd; only a running one). Only where systemd does not run
# (test machines and containers, as here) is libvirtd stopped and started with
# `libvirtd -d`. Running guests keep running across the restart. An unchanged hook is
# left alone. LVW_HOOK_NO_RESTART=1 installs without restarting; LVW_HOOKS_DIR stages the
# hook elsewhere (install.sh's DESTDIR).
set -euo pipefail
cd "$(dirname "$0")/.."

HOOKS=${LVW_HOOKS_DIR:-/etc/libvirt/hooks}
TARGET=$HOOKS/qemu.d/libvirt-volume-watcher
SOURCE=watcher/libvirt_hook.py
URI=qemu:///system

if [ "$(head -n 1 "$SOURCE")" != "#!/usr/bin/python3 -IS" ]; then
  echo "install-hook: $SOURCE must start with #!/usr/bin/python3 -IS" >&2; exit 1
fi
if [ -x "$TARGET" ] && cmp -s "$SOURCE" "$TARGET"; then
  echo "install-hook: $TARGET is up to date"
  exit 0
fi

mkdir -p "$HOOKS/qemu.d"
# Write next to the directory libvirtd scans, then rename: it never sees a partial file.
tmp=$(mktemp "$HOOKS/.libvirt-volume-watcher.XXXXXX")
trap 'rm -f "$tmp"' EXIT
install -m 0755 "$SOURCE" "$tmp"
mv -f "$tmp" "$TARGET"
echo "install-hook: installed $TARGET"

if [ "${LVW_HOOK_NO_RESTART:-0}" = 1 ]; then
  echo "install-hook: restart libvirtd for the hook to take effect"; exit 0
fi

if [ -d /run/systemd/system ]; then
  for unit in virtqemud.service libvirtd.service; do
    if systemctl is-active --quiet "$unit"; then
      echo "install-hook: restarting $unit so it reads the hook"
      exec systemctl try-restart "$unit"
    fi
  done
  echo "install-hook: libvirt is not running; it reads the hook when it starts"
  exit 0
fi
if pgrep -x virtqemud >/dev/null; then
  echo "install-hook: restart virtqemud for the hook to take effect"; exit 0
fi

pid=$(cat /run/libvirtd.pid 2>/dev/null || true)
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
  pid=$(pgrep -x libvirtd | head -n 1 || true)
fi
if [ -n "$pid" ]; then
  echo "install-hook: restarting libvirtd (pid $pid) so it reads the hook"
  kill "$pid"
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "install-hook: libvirtd (pid $pid) did not exit" >&2; exit 1
  fi
fi
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu
pgrep -x virtlogd >/dev/null || virtlogd -d
# A pid file still held by the old daemon makes a start fail; retry briefly.
for _ in 1 2 3 4 5; do
  libvirtd -d 2>/dev/null || true
  for _ in $(seq 30); do
    virsh -c "$URI" version >/dev/null 2>&1 && { echo "install-hook: libvirtd is up"; exit 0; }
    sleep 0.2
  done
done
echo "install-hook: libvirtd did not come back" >&2
exit 1
