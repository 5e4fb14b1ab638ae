#!/usr/bin/env bash
# Installs what the tests and the demo need when it is missing: Debian's varnish (7.1)
# and varnish-modules (xkey, vsthrottle) for the demo and every end-to-end test;
# chromium only for the tests (the dashboard is checked in headless Chromium); and
# systemd's systemd-analyze only for the tests (the shipped units are verified with it);
# PowerDNS (pdns-server, pdns-backend-remote) and dig (bind9-dnsutils) only for the
# tests (geo routing answers a real pdns, queried with dig); etcd (etcd-server) only for
# the tests (the etcd client and the HA store run against a real 3-member cluster);
# dpkg-dev (dpkg-shlibdeps) and adduser for scripts/package.sh and its test; prometheus
# (promtool, and a real Prometheus) only for the tests (the shipped alert rules are
# unit-tested with promtool, the dashboard's queries run against a real Prometheus).
# No protoc is needed (protox compiles .proto).
#
#   scripts/install-deps.sh          everything the tests need (scripts/test.sh runs this)
#   scripts/install-deps.sh --demo   only varnish and varnish-modules (scripts/demo.sh)
set -euo pipefail
demo=false
[ "${1:-}" = "--demo" ] && demo=true
need=()
command -v varnishd >/dev/null 2>&1 || need+=(varnish)
vmods=$(pkg-config --variable=vmoddir varnishapi 2>/dev/null || echo /usr/lib/x86_64-linux-gnu/varnish/vmods)
if ! ls "$vmods"/libvmod_xkey.so >/dev/null 2>&1 && ! ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null 2>&1; then
  need+=(varnish-modules)
fi
dns=()
if ! $demo; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  command -v pdns_server >/dev/null 2>&1 || dns+=(pdns-server)
  ls /usr/lib/*/pdns/libremotebackend.so >/dev/null 2>&1 || dns+=(pdns-backend-remote)
  command -v dig >/dev/null 2>&1 || dns+=(bind9-dnsutils)
  command -v etcd >/dev/null 2>&1 || dns+=(etcd-server)
  command -v dpkg-shlibdeps >/dev/null 2>&1 || dns+=(dpkg-dev)
  command -v adduser >/dev/null 2>&1 || dns+=(adduser)
  command -v promtool >/dev/null 2>&1 || dns+=(prometheus)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # The package starts a system varnishd on :6081; the project runs its own.
  $SUDO systemctl disable --now varnish >/dev/null 2>&1 || true
fi
if [ ${#dns[@]} -gt 0 ]; then
  echo "installing: ${dns[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  [ ${#need[@]} -gt 0 ] || $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${dns[@]}" >/dev/null
  # The packages may start a system pdns on :53 and an etcd on :2379; tests run their own.
  $SUDO systemctl disable --now pdns >/dev/null 2>&1 || true
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
varnishd -V 2>&1 | head -1
