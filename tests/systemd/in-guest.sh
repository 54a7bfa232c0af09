#!/usr/bin/env bash
# Runs inside the User-Mode Linux guest booted by tests/systemd/test-unit.sh, with systemd
# as PID 1 and a throw-away writable overlay as /. Installs the package and checks the
# service as systemd runs it. Each check prints "ok: ..." with its time; the first
# failure prints "FAIL: ...", the unit's journal, and exits 1.
#
# usage: in-guest.sh PACKAGE.deb UDEV.deb
set -euo pipefail
[ $# = 2 ] || { echo "usage: in-guest.sh PACKAGE.deb UDEV.deb" >&2; exit 2; }
deb=$1 udev_deb=$2
[ "${LVW_UML_SYSTEMD:-}" = 1 ] && [ "$(cat /proc/1/comm)" = systemd ] || {
  echo "in-guest.sh: not in a guest booted by uml-run -s; run tests/systemd/test-unit.sh" >&2
  exit 2; }
here=$(cd "$(dirname "$0")" && pwd)

pkg=libvirt-volume-watcher
unit=$pkg.service
etc=/etc/$pkg
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0 LC_ALL=C
t0=$(date +%s.%N)
elapsed() { printf '%.1f' "$(echo "$(date +%s.%N) - ${1:-$t0}" | bc)"; }
ok() { printf 'ok: %s [%ss]\n' "$*" "$(elapsed)"; }
fail() {
  printf 'FAIL: %s [%ss]\n' "$*" "$(elapsed)"
  systemctl status "$unit" --no-pager -n 0 || true
  journalctl -u "$unit" -u lvw-sandbox-probe.service --no-pager -o short-monotonic | tail -n 60
  exit 1
}
# wait_for SECONDS CMD...: polls CMD every 0.2 s until it succeeds; fails after SECONDS.
wait_for() {
  local limit=$1; shift
  local end; end=$(echo "$(date +%s.%N) + $limit" | bc)
  until "$@" 2>/dev/null; do
    [ "$(echo "$(date +%s.%N) > $end" | bc)" = 0 ] || return 1
    sleep 0.2
  done
}
prop() { systemctl show -P "$1" "$unit"; }
metric() {  # metric NAME{LABELS}: its value on /metrics, or nothing
  curl -fsS http://127.0.0.1:9700/metrics | awk -v name="$1" '$1 == name { print $2 }'
}
metric_is() { [ "$(metric "$1")" = "$2" ]; }
active_with_pid() { [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" = "$1" ]; }
restarted_from() { local pid; pid=$(prop MainPID); [ "$pid" != 0 ] && [ "$pid" != "$1" ] \
  && [ "$(prop ActiveState)" = active ]; }

# ---- the guest's own broker and libvirtd (no network to the host), and udev ------------
# The overlay holds copies of the host's broker database and libvirt definitions: the
# guest's services start empty instead (only the guest's copies are removed).
rm -rf /var/lib/rabbitmq/mnesia
rm -f /etc/libvirt/qemu/*.xml /etc/libvirt/storage/*.xml /etc/libvirt/hooks/qemu.d/$pkg
systemctl start --no-block rabbitmq-server.service libvirtd.service
dpkg -i "$udev_deb" >/var/log/udev-install.log 2>&1 || { cat /var/log/udev-install.log; fail "dpkg -i udev"; }
systemctl start systemd-udevd.service systemd-udev-trigger.service
udevadm settle -t 30
ok "udev running"

# ---- install ---------------------------------------------------------------------------
wait_for 60 systemctl is-active --quiet libvirtd.service || fail "libvirtd did not start"
libvirtd_pid=$(systemctl show -P MainPID libvirtd.service)
dpkg -i "$deb" >/var/log/lvw-install.log 2>&1 || { cat /var/log/lvw-install.log; fail "dpkg -i"; }
grep -q "systemctl enable --now $pkg" /var/log/lvw-install.log || fail "no first-install hint"
[ "$(systemctl is-enabled "$unit" || true)" = disabled ] || fail "enabled on install"
grep -q "restarting libvirtd.service" /var/log/lvw-install.log || fail "postinst: no libvirtd restart"
[ "$(systemctl show -P MainPID libvirtd.service)" != "$libvirtd_pid" ] \
  || fail "postinst did not restart libvirtd through systemd"
[ -x /etc/libvirt/hooks/qemu.d/$pkg ] || fail "hook not installed"
ok "dpkg -i $(basename "$deb"): hook installed, libvirtd restarted by systemctl, not enabled"
problems=$(systemd-analyze verify "$unit" 2>&1 | grep -v -e 'rabbitmq' -e '^$' || true)
[ -z "$problems" ] || fail "systemd-analyze verify: $problems"

# One valid policy, so a reload that keeps the old policies can be told from one that
# drops them.
cat > "$etc/policies/10-web.yaml" <<'YAML'
images:
  probe-image:
    bucket: lvw-systemd-test
    key: probe.qcow2
    format: qcow2
    checksum: optional
domains:
  - match: "web-*"
    image: probe-image
YAML
$pkg check -c "$etc/config.yaml" >/dev/null || fail "check with the test config"
# Shorter watchdog and restart delay than shipped, so the test waits seconds, not a minute;
# the mechanism is the same.
mkdir -p "/etc/systemd/system/$unit.d"
printf '[Service]\nWatchdogSec=10\nRestartSec=1\n' > "/etc/systemd/system/$unit.d/test.conf"
systemctl daemon-reload

wait_for 90 systemctl is-active --quiet rabbitmq-server.service || fail "rabbitmq-server did not start"
ok "rabbitmq-server running in the guest"

# ---- start: Type=notify returns once the daemon said READY=1 -----------------------------
t=$(date +%s.%N)
systemctl start "$unit" || fail "systemctl start"
start_s=$(elapsed "$t")
[ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "not active/running"
curl -fsS http://127.0.0.1:9700/readyz >/dev/null || fail "/readyz is not 200 after READY=1"
[[ "$(prop StatusText)" == *"images cached"* ]] || fail "no STATUS= line: $(prop StatusText)"
[ "$(stat -c %a /run/$pkg)" = 755 ] || fail "/run/$pkg is not 0755"
pid=$(prop MainPID)
ok "systemctl start returned after READY=1 in ${start_s}s (pid $pid, status '$(prop StatusText)')"

# ---- reload ----------------------------------------------------------------------------
systemctl reload "$unit" || fail "reload with valid policies"
wait_for 20 metric_is 'volume_watcher_policy_reloads_total{result="ok"}' 2.0 \
  || fail "the reload did not reach the daemon"
ok "systemctl reload with valid policies: the daemon reloaded them"

printf 'images:\n  broken: [\n' > "$etc/policies/20-broken.yaml"
if systemctl reload "$unit" 2>/dev/null; then fail "reload with a broken policy succeeded"; fi
active_with_pid "$pid" || fail "a failed reload changed the service"
metric_is 'volume_watcher_policy_reloads_total{result="failed"}' 0.0 \
  || fail "the broken policy reached the daemon through systemctl reload"
ok "systemctl reload with a broken policy failed; the daemon kept running untouched"

# The daemon's own guard, for a SIGHUP that bypasses ExecReload's check.
kill -HUP "$pid"
wait_for 20 metric_is 'volume_watcher_policy_reloads_total{result="failed"}' 1.0 \
  || fail "SIGHUP with a broken policy: no failed reload counted"
metric_is volume_watcher_policy_images 1.0 || fail "the previous policies were not kept"
active_with_pid "$pid" || fail "SIGHUP with a broken policy changed the service"
ok "SIGHUP with a broken policy: reload failed, previous policies (1 image) kept"

# ---- journal priorities ------------------------------------------------------------------
# journald takes in the daemon's line a moment after the counter moved.
err_logged() { journalctl -p err -u "$unit" -o cat --no-pager | grep -q 'policy error'; }
wait_for 20 err_logged || true
errors=$(journalctl -p err -u "$unit" -o cat --no-pager)
grep -q 'policy error' <<< "$errors" || fail "journalctl -p err shows no policy error: $errors"
grep -q '"ready"' <<< "$errors" && fail "info lines are logged at priority err"
[ "$(journalctl -u "$unit" -o json --no-pager | jq -r 'select(.MESSAGE | test("policy error")) | .PRIORITY' | sort -u)" = 3 ] \
  || fail "policy errors are not at priority 3"
ok "journalctl -p err -u $unit: $(grep -m1 'policy error' <<< "$errors" | cut -c1-120)"
rm "$etc/policies/20-broken.yaml"

# ---- stop: drains and exits well inside TimeoutStopSec --------------------------------------
t=$(date +%s.%N)
systemctl stop "$unit"
stop_s=$(elapsed "$t")
[ "$(prop Result)" = success ] || fail "stop result $(prop Result)"
[ "$(prop ExecMainStatus)" = 0 ] || fail "exit status $(prop ExecMainStatus) on stop"
limit=$(( $(prop TimeoutStopUSec | sed 's/min/*60+/; s/s$//; s/+$//') ))
[ "$(echo "$stop_s < $limit" | bc)" = 1 ] || fail "stop took ${stop_s}s, limit ${limit}s"
[ ! -e /run/$pkg ] || fail "/run/$pkg left after stop"
drain_s=$(journalctl -u "$unit" -o cat --no-pager | jq -R 'fromjson? | select(.event == "stopped") | .seconds' | tail -n 1)
ok "systemctl stop in ${stop_s}s (the daemon's drain ${drain_s}s; TimeoutStopSec ${limit}s), exit 0"

# ---- LVM and qemu-img inside the unit's sandbox ------------------------------------------
truncate -s 96M /var/lib/lvw-test-pv.img
loop=$(losetup --find --show /var/lib/lvw-test-pv.img)
pvcreate -qq "$loop" && vgcreate -qq lvwtest "$loop" && lvcreate -qq -y -L 16M -n root1 lvwtest \
  || fail "creating the test VG on $loop"
udevadm settle -t 30
state=/var/lib/$pkg
python3 -c "import sys; sys.stdout.buffer.write(b'libvirt-volume-watcher sandbox probe' + bytes(4096))" \
  > "$state/probe.raw"
qemu-img convert -q -f raw -O qcow2 "$state/probe.raw" "$state/probe.qcow2"
# The installed unit with its sandbox, the probe as its main process.
sed -e '/^\(ExecStart\|ExecReload\|Type\|NotifyAccess\|WatchdogSec\|Restart\|RestartSec\)=/d' \
  "/usr/lib/systemd/system/$unit" > /etc/systemd/system/lvw-sandbox-probe.service
cat >> /etc/systemd/system/lvw-sandbox-probe.service <<UNIT
[Service]
Type=oneshot
ExecStart=/usr/lib/$pkg/bin/python $here/sandbox_probe.py /dev/lvwtest/root1 $state/probe.qcow2 /dev/ubda
UNIT
systemctl daemon-reload
systemctl start lvw-sandbox-probe.service || fail "the sandbox probe failed"
journalctl -u lvw-sandbox-probe.service -o cat --no-pager | grep '^sandbox probe:' | sed 's/^/  /'
journalctl -u lvw-sandbox-probe.service -o cat --no-pager | grep -qx 'sandbox probe: ok' \
  || fail "no verdict from the sandbox probe"
[ "$(lvs --noheadings -o lv_size --units m --nosuffix lvwtest/root1 | tr -d ' ')" = 24.00 ] \
  || fail "the LV did not grow"
ok "lvs, lvextend, lvcreate --snapshot and qemu-img on a loop PV under the unit's sandbox"
# The PVs' device class matters, not only the LV's: without block-loop, lvs cannot read
# the PV and the LV is not recognised.
mkdir -p /etc/systemd/system/lvw-sandbox-probe.service.d
printf '[Service]\nDeviceAllow=\nDeviceAllow=block-device-mapper rw\nDeviceAllow=/dev/mapper/control rw\n' \
  > /etc/systemd/system/lvw-sandbox-probe.service.d/no-loop.conf
systemctl daemon-reload
if systemctl start lvw-sandbox-probe.service 2>/dev/null; then
  fail "the probe passed without block-loop allowed: DeviceAllow is not in force"
fi
journalctl -u lvw-sandbox-probe.service -o cat --no-pager | grep -q 'lvs does not see' \
  || fail "without block-loop the probe failed for another reason"
ok "without DeviceAllow=block-loop (the PV's class) lvs does not see the LV"

# ---- the watchdog: a wedged daemon is killed and restarted ----------------------------------
systemctl start "$unit" || fail "second start"
pid=$(prop MainPID)
restarts=$(prop NRestarts)
t=$(date +%s.%N)
kill -STOP "$pid"
wait_for 120 restarted_from "$pid" || fail "no restart after SIGSTOP"
[ "$(prop NRestarts)" -gt "$restarts" ] || fail "NRestarts did not grow"
watchdog_logged() { journalctl -u "$unit" -o cat --no-pager | grep -q 'Watchdog timeout'; }
wait_for 20 watchdog_logged || fail "no watchdog timeout logged"
ok "SIGSTOP: watchdog timeout, restarted and ready again in $(elapsed "$t")s (pid $(prop MainPID))"
systemctl stop "$unit"

# ---- purge under systemd: prerm stops the service, nothing left ------------------------------
systemctl start "$unit"
dpkg -P "$pkg" >/var/log/lvw-purge.log 2>&1 || { cat /var/log/lvw-purge.log; fail "dpkg -P"; }
! systemctl is-active --quiet "$unit" || fail "still active after dpkg -P"
for path in /usr/lib/$pkg /etc/$pkg /var/lib/$pkg /run/$pkg; do
  [ ! -e "$path" ] || fail "$path left after dpkg -P"
done
ok "dpkg -P stopped the running service and left nothing"
echo "ok: all in $(elapsed)s"
