#!/usr/bin/env bash
# Installs libvirt-volume-watcher as a systemd service on this host, from this checkout:
#   - a virtualenv in /opt/libvirt-volume-watcher/venv holding the project (with OTLP export),
#   - the unit in /etc/systemd/system and the tmpfiles rules in /usr/lib/tmpfiles.d,
#   - /etc/libvirt-volume-watcher/{config.yaml,policies/,credentials/} (an existing
#     config is never overwritten; the shipped one is put next to it as config.yaml.dist),
#   - the libvirt hook, through scripts/install-hook.sh when present.
# It does not enable or start the service: it prints the next steps instead.
# Re-running it upgrades the project in the venv and refreshes the unit.
#
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.11);
# DESTDIR (stage everything under another root, e.g. to build a package; then
# nothing is reloaded and root is not required).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
destdir=${DESTDIR:-}
py=${PYTHON:-python3}
prefix=/opt/libvirt-volume-watcher
etc=/etc/libvirt-volume-watcher
venv=$destdir$prefix/venv

say() { printf 'install: %s\n' "$*"; }

if [ -z "$destdir" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install: run as root (or set DESTDIR to stage the files elsewhere)" >&2
  exit 1
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install: $py is missing or older than Python 3.11 (set PYTHON=...)" >&2
  exit 1
fi

# 1. The program: a venv of its own, so the host's Python packages are never touched.
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  install -d -m 0755 "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
say "installing the project into $venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet --upgrade "$src[otlp]"

# 2. systemd files.
install -D -m 0644 "$src/systemd/libvirt-volume-watcher.service" \
  "$destdir/etc/systemd/system/libvirt-volume-watcher.service"
install -D -m 0644 "$src/systemd/libvirt-volume-watcher.tmpfiles" \
  "$destdir/usr/lib/tmpfiles.d/libvirt-volume-watcher.conf"
say "installed the unit and the tmpfiles rules"

# 3. Directories (the tmpfiles rules recreate them at boot) and the config.
install -d -m 0755 "$destdir$etc" "$destdir$etc/policies"
install -d -m 0700 "$destdir$etc/credentials"
chmod 0700 "$destdir$etc/credentials"
install -d -m 0750 "$destdir/var/lib/libvirt-volume-watcher" \
  "$destdir/var/lib/libvirt-volume-watcher/cache"
if [ -e "$destdir$etc/config.yaml" ]; then
  if ! cmp -s "$src/systemd/config.yaml" "$destdir$etc/config.yaml"; then
    install -m 0640 "$src/systemd/config.yaml" "$destdir$etc/config.yaml.dist"
    say "kept $etc/config.yaml; the shipped default is in config.yaml.dist"
  fi
else
  install -m 0640 "$src/systemd/config.yaml" "$destdir$etc/config.yaml"
  say "installed $etc/config.yaml"
fi
if command -v systemd-tmpfiles >/dev/null; then
  systemd-tmpfiles --create ${destdir:+"--root=$destdir"} \
    "$destdir/usr/lib/tmpfiles.d/libvirt-volume-watcher.conf"
fi

# 4. The libvirt hook (its own script knows where libvirt looks for hooks).
if [ -x "$src/scripts/install-hook.sh" ]; then
  "$src/scripts/install-hook.sh"
elif [ -e "$src/scripts/install-hook.sh" ]; then
  bash "$src/scripts/install-hook.sh"
else
  say "no scripts/install-hook.sh in this checkout: libvirt hook not installed"
fi

# 5. Tell systemd, when it is the running init (not in a container or chroot).
if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload
  say "systemd reloaded"
fi

cat <<EOF
install: done. Next:
  - put secrets in $etc/credentials/ (files s3-access-key, s3-secret-key, amqp-url; mode 0600)
  - edit $etc/config.yaml and add policies to $etc/policies/
  - check: $prefix/venv/bin/libvirt-volume-watcher check --config $etc/config.yaml
  - start: systemctl enable --now libvirt-volume-watcher
EOF
