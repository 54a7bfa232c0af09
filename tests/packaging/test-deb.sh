#!/usr/bin/env bash
# The Debian package's life on this machine, as an operator lives it: build, install,
# --version and check with the shipped config, an edited conffile kept across an upgrade,
# remove (program gone, conffiles kept), purge (nothing of the package left), and the
# machine as it was before.
#
# The libvirt hook: this machine's libvirtd is shared and already runs with the hook
# scripts/install-hook.sh put at the package's path. The test sets that file aside so the
# package installs (and owns) the hook, checks that removal takes it away, then puts the
# original back, whatever happens. It never restarts libvirtd: systemd does not run here,
# so the maintainer scripts only say a restart is due.
set -euo pipefail
cd "$(dirname "$0")/../.."

pkg=libvirt-volume-watcher
hook=/etc/libvirt/hooks/qemu.d/$pkg
owned=(/usr/lib/$pkg /usr/bin/$pkg /usr/lib/systemd/system/$pkg.service
       /usr/lib/tmpfiles.d/$pkg.conf /usr/share/doc/$pkg)
created=(/etc/$pkg /var/lib/$pkg /var/cache/$pkg)
work=$(mktemp -d "${TMPDIR:-/tmp}/$pkg-test-deb.XXXXXX")

say() { printf 'test-deb: %s\n' "$*"; }
fail() { printf 'test-deb: FAIL: %s\n' "$*" >&2; exit 1; }
exists() { [ -e "$1" ] || [ -L "$1" ]; }
installed() { dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; }
known() { dpkg-query -W "$pkg" >/dev/null 2>&1; }
dpkg_() {  # dpkg ARGS, waiting (up to 5 minutes) while someone else's apt holds the lock
  local try
  for try in $(seq 150); do
    : > "$work/dpkg.last"
    dpkg "$@" </dev/null >"$work/dpkg.last" 2>&1 && { cat "$work/dpkg.last" >> "$work/dpkg.log"; return 0; }
    grep -q 'lock' "$work/dpkg.last" || break
    sleep 2
  done
  cat "$work/dpkg.last" >&2; fail "dpkg $*"
}

# Only on a machine without the package and its directories: the test removes them.
known && fail "$pkg is already known to dpkg; remove it first (dpkg -P $pkg)"
for path in "${owned[@]}" "${created[@]}"; do
  exists "$path" && fail "$path exists already; this test would remove it"
done

had_hook=0
restore() {
  set +e
  if known; then dpkg -P "$pkg" </dev/null >>"$work/dpkg.log" 2>&1; fi
  if [ "$had_hook" = 1 ] && ! cmp -s "$work/hook.orig" "$hook" 2>/dev/null; then
    cp -p "$work/hook.orig" "$hook.test-deb" && mv -f "$hook.test-deb" "$hook"
  fi
  rm -rf "$work"
}
trap restore EXIT
if exists "$hook"; then
  had_hook=1
  cp -p "$hook" "$work/hook.orig"
fi

# 1. Build, and an upgrade of the same build: the revision bumped.
started=$(date +%s)
deb=$(./scripts/build-deb.sh)
build_seconds=$(( $(date +%s) - started ))
dpkg-deb -R "$deb" "$work/next"
sed -i 's/^Version: \(.*\)-\([0-9]*\)$/Version: \1-\2+test1/' "$work/next/DEBIAN/control"
next=$work/${pkg}_next.deb
dpkg-deb --root-owner-group --build -Zgzip "$work/next" "$next" >/dev/null
version=$(dpkg-deb -f "$deb" Version); next_version=$(dpkg-deb -f "$next" Version)
dpkg --compare-versions "$next_version" gt "$version" || fail "$next_version is not newer"
say "built $deb ($version) in ${build_seconds}s; upgrade $next_version"

# 2. Install: the command, the shipped config passing check, the hook in place.
rm -f "$hook"
dpkg_ -i "$deb"
installed || fail "not installed after dpkg -i"
[ "$(command -v $pkg)" = /usr/bin/$pkg ] || fail "$pkg is not /usr/bin/$pkg on PATH"
got=$($pkg --version)
[[ "$got" == *"${version%-*}"* ]] || fail "--version says '$got', not ${version%-*}"
$pkg check -c /etc/$pkg/config.yaml > "$work/check.out" 2>&1 \
  || { cat "$work/check.out" >&2; fail "check with the shipped config"; }
# The virtualenv is relocatable: nothing names a build directory, scripts run the venv.
head -n 1 /usr/lib/$pkg/bin/$pkg | grep -qx "#!/usr/lib/$pkg/bin/python" \
  || fail "shebang: $(head -n 1 /usr/lib/$pkg/bin/$pkg)"
grep -rlsF -e "$pkg-deb." /usr/lib/$pkg && fail "files name the build directory"
[ -x "$hook" ] && cmp -s /usr/lib/$pkg/libvirt-hook "$hook" || fail "hook not installed"
[ -d /etc/$pkg/policies ] && [ -d /var/lib/$pkg/cache ] || fail "directories not created"
[ "$(stat -c %a /etc/$pkg/credentials)" = 700 ] || fail "credentials/ is not 0700"
grep -qx "/etc/$pkg/config.yaml" /var/lib/dpkg/info/$pkg.conffiles || fail "not a conffile"
say "installed: $got; check: $(tail -n 1 "$work/check.out")"

# 3. Upgrade over an edited conffile: dpkg keeps the edit (the shipped one is unchanged).
echo "# edited by the operator" >> /etc/$pkg/config.yaml
cp /etc/$pkg/config.yaml "$work/edited.yaml"
dpkg_ -i "$next"
[ "$(dpkg-query -W -f='${Version}' $pkg)" = "$next_version" ] || fail "not upgraded"
cmp -s "$work/edited.yaml" /etc/$pkg/config.yaml || fail "the edited conffile was replaced"
for leftover in /etc/$pkg/config.yaml.dpkg-*; do
  exists "$leftover" && fail "upgrade left $leftover"
done
$pkg check -c /etc/$pkg/config.yaml >/dev/null || fail "check after the upgrade"
say "upgraded to $next_version; the edited config.yaml was kept"

# 4. Remove: the program and the hook go; configuration and state stay.
dpkg_ -r "$pkg"
for path in "${owned[@]}"; do exists "$path" && fail "$path left after dpkg -r"; done
hash -r; command -v $pkg >/dev/null && fail "$pkg still on PATH after dpkg -r"
cmp -s "$work/edited.yaml" /etc/$pkg/config.yaml || fail "config.yaml gone after dpkg -r"
[ -e /etc/$pkg/example-policy.yaml ] || fail "example-policy.yaml gone after dpkg -r"
exists "$hook" && fail "the package's hook left after dpkg -r"
say "removed: program and hook gone, conffiles kept"

# Put the shared hook back now; purge must leave a hook it did not install alone.
if [ "$had_hook" = 1 ]; then
  cp -p "$work/hook.orig" "$hook.test-deb" && mv -f "$hook.test-deb" "$hook"
fi

# 5. Purge: nothing of the package is left.
dpkg_ -P "$pkg"
known && fail "dpkg still knows $pkg after dpkg -P"
for path in "${owned[@]}" "${created[@]}"; do
  exists "$path" && fail "$path left after dpkg -P"
done
if [ "$had_hook" = 1 ]; then
  cmp -s "$work/hook.orig" "$hook" || fail "purge touched the hook it did not install"
else
  exists "$hook" && fail "$hook left after dpkg -P"
fi
grep -q 'restart libvirtd (or virtqemud)' "$work/dpkg.log" \
  || fail "no note that libvirtd needs a restart"
say "purged: nothing left; the shared hook is as it was"

# 6. A hook the package did not install (scripts/install-hook.sh's) is never its to remove.
if [ "$had_hook" = 1 ]; then
  dpkg_ -i "$deb"
  exists /var/lib/$pkg/libvirt-hook.sha256 && fail "the package claimed a hook it found"
  dpkg_ -P "$pkg"
  cmp -s "$work/hook.orig" "$hook" || fail "removal took away a hook it did not install"
  for path in "${owned[@]}" "${created[@]}"; do
    exists "$path" && fail "$path left after the second dpkg -P"
  done
  say "a hook found in place is left alone by install and purge"
fi
say "ok: build ${build_seconds}s, whole test $(( $(date +%s) - started ))s"
