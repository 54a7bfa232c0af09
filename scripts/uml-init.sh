#!/bin/bash
# PID 1 of the User-Mode Linux guest started by scripts/uml-run.
#
# The root file system is the host's / (hostfs, read-only). This script mounts what a
# command needs to use LVM (proc, sys, dev, a writable /run and /etc/lvm, the host's /tmp),
# loads the device-mapper and loop modules shipped with the UML kernel, runs the job that
# uml-run wrote under /tmp, records its exit code there and powers the guest off.
# PID 1 must never exit: the kernel would panic instead of powering off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/lock /run/lvm
mount -t hostfs -o /tmp hostfs /tmp

cmdline=$(cat /proc/cmdline)
param() { local word; for word in $cmdline; do case $word in "$1="*) echo "${word#*=}" ;; esac; done; }
job=$(param uml_job)
IFS=, read -r -a writable <<< "$(param uml_rw)"
for dir in "${writable[@]}"; do
  mount -t hostfs -o "$dir" hostfs "$dir"
done

# LVM writes its archive and backup under /etc/lvm.
mkdir /run/etc-lvm && cp -a /etc/lvm/. /run/etc-lvm/ && mount --bind /run/etc-lvm /etc/lvm

# The UML kernel's modules are under /usr/lib/uml/modules, and the host may have no
# /lib/modules to mount them on: point modprobe at a root that has them.
mkdir -p /run/uml-modules/lib
ln -s /usr/lib/uml/modules /run/uml-modules/lib/modules
for module in dm-mod dm-snapshot dm-thin-pool dm-zero loop; do
  modprobe -d /run/uml-modules "$module" || echo "uml-init: cannot load $module" >/dev/console
done

# Guest stdout is a tty: stop it from turning \n into \r\n on the way to the host.
stty -F /dev/tty1 -opost 2>/dev/null
stty -F /dev/console -opost 2>/dev/null

# tty1 is the host's stdout, the console its stderr.
(
  cd "$(cat "$job/cwd")" || exit 126
  while IFS= read -r -d '' assignment; do
    case ${assignment%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac
    export "$assignment"
  done < "$job/env"
  export DM_DISABLE_UDEV=1     # no udevd here: libdevmapper creates the /dev nodes itself
  export LVW_UML_GUEST=1       # lets test suites know they run on real device-mapper
  mapfile -d '' argv < "$job/argv"
  exec "${argv[@]}"
) </dev/null >/dev/tty1 2>/dev/console
echo $? > "$job/rc"

sync
poweroff -f -f >/dev/null 2>&1
echo o > /proc/sysrq-trigger
sleep 60
