#!/usr/bin/env bash
# Makes sure a User-Mode Linux kernel that boots on this CPU is available to uml-run.
#
# Why: Debian 12's user-mode-linux (6.1) and Debian 13's (6.12) cannot start init on a
# CPU whose extended FPU state is larger than UML's fixed buffer (Intel AMX: "userspace -
# ptrace set fp regs failed, errno = 14" and a kernel panic). UML kernels from 7.x size
# that buffer from the host. When the distribution's kernel fails a one-second probe,
# this fetches user-mode-linux from Debian unstable, with that suite's libc6 as its
# private C library (it needs glibc >= 2.38), through apt with a source list of its own
# (the host's apt configuration is not changed), and installs it in $LVW_UML_DIR
# (default /opt/libvirt-volume-watcher-uml): linux.uml with its ELF interpreter and
# library path pointed at that libc (patchelf), and its modules under
# /usr/lib/uml/modules/<version>, where the guest's init finds them. uml-run prefers
# that kernel when it exists. Idempotent: a kernel that boots is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${LVW_UML_DIR:-/opt/libvirt-volume-watcher-uml}
probe() { LVW_UML_KERNEL=$1 ./scripts/uml-run -t 60 -m 128M -- /bin/true >/dev/null 2>&1; }

if [ -x "$dir/linux.uml" ] && probe "$dir/linux.uml"; then
  exit 0
fi
if probe "$(command -v linux.uml)"; then
  exit 0
fi
echo "uml-kernel: the distribution's UML kernel does not boot on this CPU; fetching a newer one" >&2

command -v patchelf >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends patchelf >/dev/null; }
apt_dir=$dir/apt
rm -rf "$apt_dir" "$dir/root"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dir/root"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
  > "$apt_dir/sources.list"
opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
      -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" update -qq
(cd "$apt_dir" && apt-get "${opts[@]}" download -qq user-mode-linux libc6)
for deb in "$apt_dir"/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done

libdir=$dir/root/usr/lib/x86_64-linux-gnu
cp "$dir/root/usr/bin/linux.uml" "$dir/linux.uml.new"
patchelf --set-interpreter "$libdir/ld-linux-x86-64.so.2" --set-rpath "$libdir" "$dir/linux.uml.new"
for modules in "$dir"/root/usr/lib/uml/modules/*; do
  rm -rf "/usr/lib/uml/modules/$(basename "$modules")"
  mkdir -p /usr/lib/uml/modules
  cp -a "$modules" /usr/lib/uml/modules/
done
mv "$dir/linux.uml.new" "$dir/linux.uml"
rm -rf "$apt_dir/cache"

if ! probe "$dir/linux.uml"; then
  echo "uml-kernel: $dir/linux.uml does not boot either; the LVM suite cannot run here" >&2
  exit 1
fi
echo "uml-kernel: installed $("$dir/linux.uml" --version 2>/dev/null | head -1 || true) in $dir" >&2
