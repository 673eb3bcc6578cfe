#!/usr/bin/env bash
# The Debian packages the test suite runs for real: Prometheus (dashboard check), Chromium
# (web console tests) and kubectl (manifests render offline). Installs only what is missing,
# so a second run costs nothing; without root or apt it says what is missing and goes on
# (the tests that need it then skip with that reason).
set -uo pipefail

missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-system-deps: not root or no apt-get; missing: ${missing[*]}" >&2
    exit 0
fi
echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "install-system-deps: apt-get install ${missing[*]} failed" >&2
# Debian starts services it installs; the tests run their own Prometheus on their own ports.
if command -v systemctl >/dev/null; then systemctl stop prometheus prometheus-node-exporter 2>/dev/null; fi
pkill -x prometheus 2>/dev/null; pkill -f prometheus-node-exporter 2>/dev/null
exit 0
