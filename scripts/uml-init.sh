#!/bin/bash
# PID 1 of the User-Mode Linux guest started by scripts/uml-run.
#
# The root file system is the host's / (hostfs, read-only). This script mounts what a
# command needs to use LVM (proc, sys, dev, a writable /run and /etc/lvm, the host's /tmp),
# loads the device-mapper and loop modules shipped with the UML kernel, runs the job that
# uml-run wrote under /tmp, records its exit code there and powers the guest off.
# PID 1 must never exit: the kernel would panic instead of powering off.
#
# With uml_systemd=1 (uml-run -s) it boots the host's /lib/systemd/systemd as PID 1
# instead, on an overlay over the host's / whose upper layer is a tmpfs: /etc, /var and
# /usr are writable and every change is gone at power-off. systemd starts a target of its
# own (uml-job.target: the journal, udev, tmpfiles and the job's service), not the host's
# enabled services. The job's service runs this script again as "run-job", which runs the
# job, records its exit code and powers the guest off at once.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# PID 1 sees the host's /proc through hostfs until it mounts its own.
[ $$ != 1 ] || mount -t proc proc /proc
cmdline=$(cat /proc/cmdline)
param() { local word; for word in $cmdline; do case $word in "$1="*) echo "${word#*=}" ;; esac; done; }
job=$(param uml_job)
under_systemd=$(param uml_systemd)

# Guest stdout is a tty: stop it from turning \n into \r\n on the way to the host.
raw_ttys() {
  stty -F /dev/tty1 -opost 2>/dev/null
  stty -F /dev/console -opost 2>/dev/null
}

# The job uml-run wrote, with its working directory, environment and argv; its exit code
# goes to $job/rc. tty1 is the host's stdout, the console its stderr.
run_job() {
  (
    cd "$(cat "$job/cwd")" || exit 126
    while IFS= read -r -d '' assignment; do
      case ${assignment%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
      export "$assignment"
    done < "$job/env"
    if [ "$under_systemd" = 1 ]; then
      export LVW_UML_SYSTEMD=1   # systemd is PID 1; udevd runs
    else
      export DM_DISABLE_UDEV=1   # no udevd here: libdevmapper creates the /dev nodes itself
    fi
    export LVW_UML_GUEST=1       # lets test suites know they run on real device-mapper
    mapfile -d '' argv < "$job/argv"
    exec "${argv[@]}"
  ) </dev/null >/dev/tty1 2>/dev/console
  echo $? > "$job/rc"
  sync
}

if [ "${1:-}" = run-job ]; then  # the job's service, under systemd
  job=/run/uml-job
  raw_ttys
  run_job
  systemctl poweroff --force --force  # straight to the kernel: the job was all there was
  exit 0
fi

mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/lock /run/lvm
mount -t hostfs -o /tmp hostfs /tmp

IFS=, read -r -a writable <<< "$(param uml_rw)"
for dir in "${writable[@]}"; do
  mount -t hostfs -o "$dir" hostfs "$dir"
done

# LVM writes its archive and backup under /etc/lvm (under systemd all of /etc is writable).
if [ "$under_systemd" != 1 ]; then
  mkdir /run/etc-lvm && cp -a /etc/lvm/. /run/etc-lvm/ && mount --bind /run/etc-lvm /etc/lvm
fi

# The UML kernel's modules are under /usr/lib/uml/modules, and the host may have no
# /lib/modules to mount them on: point modprobe at a root that has them.
mkdir -p /run/uml-modules/lib
ln -s /usr/lib/uml/modules /run/uml-modules/lib/modules
modules=(dm-mod dm-snapshot dm-thin-pool dm-zero loop)
[ "$under_systemd" != 1 ] || modules+=(overlay)
for module in "${modules[@]}"; do
  modprobe -d /run/uml-modules "$module" || echo "uml-init: cannot load $module" >/dev/console
done

raw_ttys

boot_systemd() {
  # /media is an empty directory on Debian: the tmpfs holding the overlay goes there.
  local top=/media root=/media/root units mnt
  mount -t tmpfs -o mode=0755 uml-overlay "$top"
  mkdir -p "$top/upper" "$top/work" "$root"
  mount -t overlay -o "lowerdir=/,upperdir=$top/upper,workdir=$top/work" uml-root "$root" || return 1
  # Never the host's /tmp: systemd-tmpfiles empties /tmp at boot. The guest gets a /tmp
  # and a /run of its own; the job directory is the one host directory it writes
  # (besides uml-run -w ones), at /run/uml-job.
  mount -t tmpfs -o mode=1777,nosuid,nodev uml-tmp "$root/tmp"
  mount -t tmpfs -o mode=0755,nosuid,nodev uml-run "$root/run"
  mkdir "$root/run/uml-job"
  mount -t hostfs -o "$job" hostfs "$root/run/uml-job"
  # The host is a container; the guest is not: systemd would skip udevd and more.
  rm -f "$root/.dockerenv" "$root/run/.containerenv"
  # The kernel's modules where systemd and modprobe look for them.
  mkdir -p "$root/lib/modules"
  ln -sfn /usr/lib/uml/modules/"$(uname -r)" "$root/lib/modules/$(uname -r)"
  units=$root/etc/systemd/system
  cat > "$units/uml-job.target" <<UNIT
[Unit]
Description=uml-run job
Requires=sysinit.target uml-job.service
After=sysinit.target
AllowIsolate=yes
UNIT
  cat > "$units/uml-job.service" <<UNIT
[Unit]
Description=uml-run job
After=sysinit.target
[Service]
Type=simple
ExecStart=/bin/bash /run/uml-job/init run-job
UNIT
  # What a container's root lacks or must not run in the guest.
  for unit in systemd-remount-fs.service systemd-firstboot.service getty.target \
              systemd-vconsole-setup.service console-getty.service; do
    ln -sfn /dev/null "$units/$unit"
  done
  for mnt in /proc /sys /dev "${writable[@]}"; do
    mount --move "$mnt" "$root$mnt"
  done
  umount /tmp /run
  cd "$root" || return 1
  pivot_root . media
  exec chroot . /bin/sh -c 'umount -l /media; exec /lib/systemd/systemd --unit=uml-job.target' \
    </dev/console >/dev/console 2>&1
}

if [ "$under_systemd" = 1 ]; then
  boot_systemd
  echo "uml-init: cannot boot systemd" >/dev/console
else
  run_job
fi

sync
poweroff -f -f >/dev/null 2>&1
echo o > /proc/sysrq-trigger
sleep 60
