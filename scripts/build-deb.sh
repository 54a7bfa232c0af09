#!/usr/bin/env bash
# Builds the Debian package of libvirt-volume-watcher from this checkout, with dpkg-deb:
#   /usr/lib/libvirt-volume-watcher   a virtualenv on Debian's python3 holding the project
#                                     and its dependencies from PyPI (with OTLP export)
#   /usr/bin/libvirt-volume-watcher   the command, a link into the virtualenv
#   /usr/lib/systemd/system/libvirt-volume-watcher.service, /usr/lib/tmpfiles.d/...conf
#   /etc/libvirt-volume-watcher/{config.yaml,example-policy.yaml}   conffiles
#   /usr/lib/libvirt-volume-watcher/libvirt-hook   copied into libvirt's hooks by postinst
#   /usr/share/doc/libvirt-volume-watcher/{copyright,README.md.gz,docs/*.md.gz}
# The maintainer scripts and the copyright file are in packaging/deb/.
#
# The virtualenv is built in a staging directory and then made relocatable: script
# shebangs and pyvenv.cfg name the final path, byte code is compiled with the final path,
# pip and the activate scripts are left out, and the build fails if any file still names
# the staging directory. pip's cache (~/.cache/pip, or PIP_CACHE_DIR) keeps the wheels, so
# a rebuild downloads and compiles nothing.
#
# Environment: LVW_DEB_REVISION (Debian revision, default 1; bump it for an upgrade),
# LVW_DEB_OUT (output directory, default build/deb). Prints the path of the .deb last.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD

pkg=libvirt-volume-watcher
lib=/usr/lib/$pkg
out=${LVW_DEB_OUT:-$src/build/deb}
revision=${LVW_DEB_REVISION:-1}
say() { printf 'build-deb: %s\n' "$*" >&2; }

for tool in dpkg-deb gcc pkg-config; do
  command -v "$tool" >/dev/null || { say "$tool is missing (./scripts/setup.sh installs it)"; exit 1; }
done
# Debian's interpreter, never one from PATH (pyenv and the like): the package depends on it.
pyver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py=/usr/bin/python$pyver
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')-$revision
arch=$(dpkg --print-architecture)
deb=$out/${pkg}_${version}_${arch}.deb

stage=$(mktemp -d "${TMPDIR:-/tmp}/$pkg-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
venv=$root$lib
started=$(date +%s)

# 1. The virtualenv, from a wheel of this checkout (so no build path is recorded in it).
say "building the virtualenv with $py"
"$py" -m venv "$venv"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$stage/wheel" "$src" 2>&1 \
  | { grep -v '^WARNING: Location' >&2 || true; }
wheel=$(echo "$stage"/wheel/*.whl)
"$venv/bin/python" -m pip install --quiet --no-compile --disable-pip-version-check \
  "$wheel[otlp]" 2>&1 | { grep -v '^WARNING: Location' >&2 || true; }
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1 "$venv"/bin/pip*
rm -rf "$venv"/lib/python*/site-packages/*.dist-info/direct_url.json "$venv/include"

# 2. Relocate: shebangs and pyvenv.cfg name the installed path.
for script in "$venv"/bin/*; do
  [ -f "$script" ] && [ ! -L "$script" ] || continue
  if head -n 1 "$script" | grep -q "^#!$venv/bin/python"; then
    sed -i "1s|^#!$venv/bin/python|#!$lib/bin/python|" "$script"
  fi
done
sed -i "s|$venv|$lib|g" "$venv/pyvenv.cfg"
# Byte code records its source path: compile with the installed one.
"$py" -m compileall -q -j 0 -s "$root" -p / "$venv/lib" >/dev/null
if leftover=$(grep -rlF "$stage" "$root"); then
  say "files still naming the build directory $stage:"; echo "$leftover" >&2; exit 1
fi

# 3. Everything around the program.
install -d "$root/usr/bin"
ln -s "../lib/$pkg/bin/$pkg" "$root/usr/bin/$pkg"
install -m 0755 watcher/libvirt_hook.py "$venv/libvirt-hook"
install -D -m 0644 systemd/libvirt-volume-watcher.service "$root/usr/lib/systemd/system/$pkg.service"
sed -i "s|/opt/$pkg/venv/bin/$pkg|/usr/bin/$pkg|g" "$root/usr/lib/systemd/system/$pkg.service"
grep -q "^ExecStart=/usr/bin/$pkg run" "$root/usr/lib/systemd/system/$pkg.service"
install -D -m 0644 systemd/libvirt-volume-watcher.tmpfiles "$root/usr/lib/tmpfiles.d/$pkg.conf"
install -D -m 0640 systemd/config.yaml "$root/etc/$pkg/config.yaml"
install -D -m 0644 policies/example.yaml "$root/etc/$pkg/example-policy.yaml"
install -D -m 0644 packaging/deb/copyright "$root/usr/share/doc/$pkg/copyright"
gzip -9n < README.md > "$root/usr/share/doc/$pkg/README.md.gz"
install -d "$root/usr/share/doc/$pkg/docs"
for doc in docs/*.md; do
  gzip -9n < "$doc" > "$root/usr/share/doc/$pkg/docs/$(basename "$doc").gz"
done

# 4. Control files.
install -d "$root/DEBIAN"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
install -m 0644 packaging/deb/conffiles "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: libvirt-volume-watcher maintainers <root@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: python$pyver, libvirt0, qemu-utils
Recommends: libvirt-daemon-system, lvm2
Section: admin
Priority: optional
Description: pre-warms VM base images from S3 and reprovisions libvirt root volumes
 A daemon for libvirt/KVM hosts: it keeps the VM base images its policies name cached
 and verified on local disk, as MinIO announces them over AMQP, and rewrites a shut-off
 domain's root volume (file or LVM) when the domain's metadata asks for it.
EOF

install -d "$out"
dpkg-deb --root-owner-group --build -Zgzip "$root" "$deb" >/dev/null
say "built $deb ($(du -h "$deb" | cut -f1)) in $(( $(date +%s) - started )) s"
echo "$deb"
