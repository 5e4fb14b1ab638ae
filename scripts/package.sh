#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:
#   varnish-coordinator_<version>_<arch>.deb  coordinator (server and ops CLI), warmer, the
#                                             unit, /etc/coordinator/coordinator.toml, the
#                                             Magento bundle in /usr/share/varnish-coordinator/vcl
#   varnish-edge-agent_<version>_<arch>.deb   edge-agent, the unit,
#                                             /etc/edge-agent/edge-agent.toml, the varnishd drop-in
#                                             as an example
#
#   scripts/package.sh [--profile release|debug] [--no-build]
#
# --profile: which cargo build goes in (release by default; the test packages the debug
# build, which the test command has built already). --no-build: package the binaries in
# $CARGO_TARGET_DIR (default target/)/<profile>/ as they are. The binaries name the
# commit they were built from (`--version`): set GIT_COMMIT when building from a tarball
# without .git.
#
# Plain dpkg-deb (no cargo-deb, no debhelper); dpkg-shlibdeps computes Depends from the
# binaries. Maintainer scripts, copyright: deploy/debian/; units: deploy/systemd/;
# config templates: deploy/config/.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --profile)
      [ $# -ge 2 ] || { echo "package.sh: --profile needs release or debug" >&2; exit 2; }
      profile=$2
      shift 2
      ;;
    --profile=*) profile=${1#--profile=}; shift ;;
    --no-build) build=no; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
target=${CARGO_TARGET_DIR:-target}
case "$profile" in
  release) cargo_profile=release; bin_dir=$target/release; compress=(-Zxz) ;;
  # Fast compression: the debug binaries are large and the package never leaves CI.
  debug) cargo_profile=dev; bin_dir=$target/debug; compress=(-Zgzip -z1) ;;
  *) echo "package.sh: --profile must be release or debug, not $profile" >&2; exit 2 ;;
esac

for tool in dpkg-deb dpkg-shlibdeps; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "package.sh: $tool is missing (apt-get install dpkg-dev; scripts/install-deps.sh does)" >&2
    exit 1
  fi
done

if [ "$build" = yes ]; then
  # The whole workspace's binaries, as the test command builds them (same features, so
  # the artifacts are shared).
  cargo build --workspace --bins --locked --profile "$cargo_profile"
fi
for bin in coordinator edge-agent warmer; do
  [ -x "$bin_dir/$bin" ] || { echo "package.sh: $bin_dir/$bin is missing (build it, or drop --no-build)" >&2; exit 1; }
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml's [workspace.package]" >&2; exit 1; }
arch=$(dpkg --print-architecture)
out=$target/debian
work=$out/build
rm -rf "$work"
mkdir -p "$work"

# Depends for the given binaries: what dpkg-shlibdeps reads off their ELF headers.
shlibs() {
  local d=$work/shlibs
  mkdir -p "$d/debian"
  printf 'Source: varnish-coordinator\n\nPackage: varnish-coordinator\nArchitecture: any\n' >"$d/debian/control"
  local abs=()
  for b in "$@"; do abs+=("$(realpath "$b")"); done
  (cd "$d" && dpkg-shlibdeps -O "${abs[@]}" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
}

# Files every package carries under /usr/share/doc/<package>/.
docs() {
  local doc=$1/usr/share/doc/$2
  install -d -m 0755 "$doc"
  install -m 0644 README.md SECURITY.md CHANGELOG.md docs/*.md "$doc/"
  install -m 0644 deploy/debian/copyright "$doc/copyright"
}

# package NAME DEPENDS RECOMMENDS DESCRIPTION: DEBIAN/ from the staged tree in $work/NAME.
package() {
  local name=$1 depends=$2 recommends=$3 description=$4
  local root=$work/$name
  install -d -m 0755 "$root/DEBIAN"
  find "$root/etc" -type f | sed "s|^$root||" | sort >"$root/DEBIAN/conffiles"
  for script in postinst prerm postrm; do
    install -m 0755 "deploy/debian/$name/$script" "$root/DEBIAN/$script"
  done
  local size
  size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: ${DEB_MAINTAINER:-varnish-coordinator <root@localhost>}"
    echo "Installed-Size: $size"
    echo "Depends: $depends"
    [ -z "$recommends" ] || echo "Recommends: $recommends"
    echo "Section: net"
    echo "Priority: optional"
    echo "Description: $description"
  } >"$root/DEBIAN/control"
  (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/control" "$root/DEBIAN/conffiles"
  local deb=$out/${name}_${version}_${arch}.deb
  dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
  echo "$deb"
}

# The coordinator: server, ops CLI (and its pki), warmer; the bundle `config push` reads.
root=$work/varnish-coordinator
install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/share/varnish-coordinator/vcl" \
  "$root/usr/share/varnish-coordinator/grafana" "$root/usr/share/varnish-coordinator/prometheus"
install -m 0755 "$bin_dir/coordinator" "$bin_dir/warmer" "$root/usr/bin/"
# Debug info stays in the build tree (the release profile keeps line tables for
# backtraces): the packaged binaries are a fraction of the size.
strip --strip-debug "$root/usr/bin/coordinator" "$root/usr/bin/warmer"
install -m 0644 deploy/systemd/coordinator.service "$root/lib/systemd/system/"
install -d -m 0750 "$root/etc/coordinator"
install -m 0640 deploy/config/coordinator.toml "$root/etc/coordinator/"
install -m 0644 edge-agent/vcl/* "$root/usr/share/varnish-coordinator/vcl/"
install -m 0644 grafana/*.json "$root/usr/share/varnish-coordinator/grafana/"
# Prometheus alert rules, and their promtool unit tests (`promtool test rules alerts_test.yml`).
install -m 0644 deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml \
  "$root/usr/share/varnish-coordinator/prometheus/"
docs "$root" varnish-coordinator
package varnish-coordinator "$(shlibs "$bin_dir/coordinator" "$bin_dir/warmer"), adduser" "" \
  "$(printf '%s\n' \
    'coordinator for geo-distributed Varnish clusters in front of Magento 2' \
    ' The one cache host Magento purges: a durable purge log fanned out to every' \
    ' region'"'"'s edge agent, config bundle rollouts with canaries, health, alerts,' \
    ' geo routing and cache warming. Includes the ops CLI, warmer and the Magento' \
    ' VCL bundle (/usr/share/varnish-coordinator/vcl).')"

# The agent, beside each varnishd.
root=$work/varnish-edge-agent
install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/share/doc/varnish-edge-agent/examples"
install -m 0755 "$bin_dir/edge-agent" "$root/usr/bin/"
strip --strip-debug "$root/usr/bin/edge-agent"
install -m 0644 deploy/systemd/edge-agent.service "$root/lib/systemd/system/"
install -d -m 0750 "$root/etc/edge-agent"
install -m 0640 deploy/config/edge-agent.toml "$root/etc/edge-agent/"
docs "$root" varnish-edge-agent
install -m 0644 deploy/systemd/varnish-edge.conf "$root/usr/share/doc/varnish-edge-agent/examples/"
package varnish-edge-agent "$(shlibs "$bin_dir/edge-agent"), adduser" "varnish (>= 7.1), varnish-modules" \
  "$(printf '%s\n' \
    'edge agent of varnish-coordinator, beside a regional varnishd' \
    ' Dials the coordinator (mutual TLS), applies its purges and config bundles to' \
    ' the local varnishd through the admin port, and reports counters, probes and' \
    ' warm progress.')"
rm -rf "$work"
