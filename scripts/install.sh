#!/usr/bin/env bash
# Installs libvirt-volume-watcher as a systemd service on this host, from this checkout:
#   - a virtualenv in /opt/libvirt-volume-watcher/venv holding the project (with OTLP export),
#   - the unit and the tmpfiles rules where systemd looks for locally installed ones,
#     /usr/local/lib/systemd/system and /usr/local/lib/tmpfiles.d (/etc/systemd/system is
#     the administrator's: drop-ins from `systemctl edit` go there and stay yours),
#   - /etc/libvirt-volume-watcher/{config.yaml,policies/,credentials/} (an existing
#     config is never overwritten; the shipped one is put next to it as config.yaml.dist),
#   - the libvirt hook, through scripts/install-hook.sh. libvirtd reads hooks when it
#     starts: it is restarted through systemctl when systemd runs, never by hand.
# It does not enable or start the service: it prints the next steps instead.
# For a Debian package, use scripts/build-deb.sh instead.
# Re-running it upgrades the project in the venv and refreshes the unit.
#
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.11);
# DESTDIR (stage everything, the hook included, under another root; then nothing is
# reloaded or restarted, the host's /etc is not touched and root is not required; the
# staged venv's scripts name the final path, so the tree can be copied to /).
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
if [ -n "$destdir" ]; then
  for script in "$venv"/bin/*; do
    [ -f "$script" ] && [ ! -L "$script" ] || continue
    sed -i "1s|^#!$venv/bin/python|#!$prefix/venv/bin/python|" "$script"
  done
  sed -i "s|$venv|$prefix/venv|g" "$venv/pyvenv.cfg" "$venv"/bin/activate*
fi

# 2. systemd files.
units=/usr/local/lib/systemd/system
tmpfiles=/usr/local/lib/tmpfiles.d/libvirt-volume-watcher.conf
install -D -m 0644 "$src/systemd/libvirt-volume-watcher.service" \
  "$destdir$units/libvirt-volume-watcher.service"
install -D -m 0644 "$src/systemd/libvirt-volume-watcher.tmpfiles" "$destdir$tmpfiles"
say "installed the unit in $units and the tmpfiles rules in $tmpfiles"
if [ -e "$destdir/etc/systemd/system/libvirt-volume-watcher.service" ]; then
  say "note: /etc/systemd/system/libvirt-volume-watcher.service (from an older install)" \
      "overrides the new unit; remove it unless it holds your own changes"
fi

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
  systemd-tmpfiles --create ${destdir:+"--root=$destdir"} "$destdir$tmpfiles"
fi

# 4. The libvirt hook. Under DESTDIR it is staged there and nothing is restarted; on the
# host, libvirt is restarted through systemd when systemd runs, and otherwise left to you.
if [ -n "$destdir" ]; then
  LVW_HOOKS_DIR="$destdir/etc/libvirt/hooks" LVW_HOOK_NO_RESTART=1 \
    bash "$src/scripts/install-hook.sh"
elif [ -d /run/systemd/system ]; then
  bash "$src/scripts/install-hook.sh"
else
  LVW_HOOK_NO_RESTART=1 bash "$src/scripts/install-hook.sh"
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
