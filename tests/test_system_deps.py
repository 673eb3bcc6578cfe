"""scripts/install-system-deps.sh (run by `make test`) on a machine without Prometheus,
Chromium and gcc: under CI a package it cannot install fails the run, naming it; it never stops or
kills a process it did not start; no service starts while apt-get installs.

The machine is faked by PATH: every program of /usr/bin and /usr/sbin except the packages'
and apt-get's, plus a fake apt-get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, stop_process

SCRIPT = ROOT / "scripts" / "install-system-deps.sh"
PACKAGES = {"prometheus", "promtool", "chromium", "gcc"}
# Installs the packages' programs as stubs, after noting what policy-rc.d answers (101: no
# service may start).
FAKE_APT = """#!/bin/sh
if [ "$1" = install ]; then
    /usr/sbin/policy-rc.d prometheus start; echo $? > {log}
    {install}
fi
exit 0
"""


def machine_without_packages(tmp_path: Path, apt: str | None) -> dict[str, str]:
    """An environment whose PATH has every program but the packages' (and apt-get unless
    `apt` is its text)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for directory in ("/usr/sbin", "/usr/bin"):
        for program in os.listdir(directory):
            if program not in PACKAGES | {"apt-get"} and not (bin_dir / program).exists():
                (bin_dir / program).symlink_to(Path(directory) / program)
    if apt is not None:
        (bin_dir / "apt-get").write_text(apt)
        (bin_dir / "apt-get").chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def run(env: dict[str, str], ci: bool) -> subprocess.CompletedProcess:
    env = {**env, "CI": "true"} if ci else env
    return subprocess.run(
        ["/usr/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("ci", [True, False])
def test_a_package_it_cannot_install_fails_ci_and_is_named(tmp_path, ci):
    failing_apt = "#!/bin/sh\n[ \"$1\" = install ] && exit 100\nexit 0\n"
    for apt in (None, failing_apt):  # no apt-get at all; apt-get that fails
        result = run(machine_without_packages(tmp_path / f"apt-{apt is not None}", apt), ci)
        assert result.returncode == (1 if ci else 0), result.stderr
        assert "missing" in result.stderr
        assert "chromium" in result.stderr and "prometheus" in result.stderr
        assert "gcc" in result.stderr
        assert ("fails the run" in result.stderr) == ci


def test_installs_without_starting_services_or_stopping_anyones_prometheus(tmp_path):
    if os.geteuid() != 0:
        message = "needs root: the script writes /usr/sbin/policy-rc.d while apt-get runs"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = tmp_path / "bin"
    stubs = " ".join(f"{bin_dir}/{program}" for program in sorted(PACKAGES))
    policy_log = tmp_path / "policy"
    install = f"for stub in {stubs}; do printf '#!/bin/sh\\n' > $stub; chmod 755 $stub; done"
    env = machine_without_packages(tmp_path, FAKE_APT.format(log=policy_log, install=install))
    # The user's own Prometheus, already running (a process named prometheus).
    own = tmp_path / "own" / "prometheus"
    own.parent.mkdir()
    shutil.copy("/usr/bin/sleep", own)
    users_prometheus = subprocess.Popen([str(own), "60"])
    policy = Path("/usr/sbin/policy-rc.d")
    policy_before = policy.read_bytes() if policy.exists() else None
    try:
        result = run(env, ci=True)
        assert result.returncode == 0, result.stderr
        assert "installing" in result.stderr
        assert policy_log.read_text().strip() == "101"  # no service started during apt-get
        assert users_prometheus.poll() is None, "the user's Prometheus was stopped"
        # A policy the machine had is left as it was; one the script added is gone.
        assert (policy.read_bytes() if policy.exists() else None) == policy_before
        assert run(env, ci=True).stderr == ""  # installed: the second run does nothing
    finally:
        stop_process(users_prometheus)
