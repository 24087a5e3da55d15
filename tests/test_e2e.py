"""The installed `usermgr` as a real process: shell pipelines, `python -m`, hidden prompts
on a real terminal (a pseudo-terminal from the stdlib `pty` module), and --debug."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import (
    CONTRACT_USER_FIELDS,
    HANG_TIMEOUT,
    PASSWORD,
    USERMGR,
    Runner,
    emails,
    login_process,
    ok,
    process_env,
    run_usermgr,
)

pytestmark = pytest.mark.e2e

PIPED_USERS = 10_000  # about 220 KB of emails: far more than a pipe holds, so `head` closes it mid-stream


# ---- a real terminal ------------------------------------------------------------------------


class Terminal:
    """A usermgr process whose controlling terminal is a pseudo-terminal we type into."""

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid
        self.transcript = ""
        self._seen = 0

    def expect(self, text: str) -> None:
        """Read until `text` appears after what was already expected."""
        while text not in self.transcript[self._seen :]:
            if not self._read():
                raise AssertionError(f"never saw {text!r}; the terminal showed {self.transcript!r}")
        self._seen += self.transcript[self._seen :].index(text) + len(text)

    def type(self, keys: str) -> None:
        """Type once usermgr waits in its read of the terminal, as a person does. Typed sooner, in
        the instant between the prompt being written and that read, Ctrl-C is lost: Python runs
        its signal handler between bytecodes, and none run before the read blocks (only a person
        faster than the scheduler could hit it; a loaded test machine did)."""
        self._wait_until_reading()
        os.write(self.fd, keys.encode())

    def _wait_until_reading(self) -> None:
        deadline = time.monotonic() + HANG_TIMEOUT
        while _process_state(self.pid) != "S":  # sleeping: after a prompt, only the read blocks
            assert time.monotonic() < deadline, f"usermgr never waited for input; it showed {self.transcript!r}"
            time.sleep(0.01)

    def finish(self) -> int:
        """Read what is left, and return the exit code; fail, not hang, if the process is still
        running HANG_TIMEOUT after it last wrote."""
        while self._read():
            pass
        deadline = time.monotonic() + HANG_TIMEOUT
        while not (ended := os.waitpid(self.pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, f"usermgr never ended; the terminal showed {self.transcript!r}"
            time.sleep(0.05)
        status = ended[1]
        self.pid = 0
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def _read(self) -> bool:
        waiting = select.poll()  # not select(): no limit on the descriptor's number
        waiting.register(self.fd, select.POLLIN)
        if not waiting.poll(HANG_TIMEOUT * 1000):
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the process closed the terminal
            return False
        self.transcript += data.decode(errors="replace").replace("\r\n", "\n")
        return bool(data)


def _process_state(pid: int) -> str:
    """R running, S sleeping in a system call, ... (proc(5)); the name may hold spaces and ')'."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


@contextmanager
def on_terminal(*args: str, env: dict[str, str]) -> Iterator[Terminal]:
    full_env = process_env(env)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pseudo-terminal is its stdin, stdout, stderr and /dev/tty
        try:
            # Ctrl-C and Ctrl-\ reach usermgr as they do from an interactive shell, also when this
            # test run was started in the background, which starts with both signals ignored
            # (a program inherits that, and Python then raises no KeyboardInterrupt).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGQUIT, signal.SIG_DFL)
            os.execve(str(USERMGR), [str(USERMGR), *args], full_env)
        finally:
            os._exit(127)
    terminal = Terminal(fd, pid)
    try:
        yield terminal
    finally:
        if terminal.pid:  # a failed test left it waiting at a prompt: end it, and only it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)


# ---- the basic journey ------------------------------------------------------------------------------


def test_init_create_login_show(empty_db_url: str, tmp_path: Path) -> None:
    key = tmp_path / "usermgr.key"
    env = {"USERMGR_DATABASE_URL": empty_db_url, "USERMGR_KEY_FILE": str(key), "USERMGR_HASH_PROFILE": "test"}
    init = ok(run_usermgr("init", env=env))
    assert init.stdout == ""
    assert "schema revision" in init.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    created = ok(
        run_usermgr(
            "create",
            "--email",
            "Ada@Example.com",
            "--password-stdin",
            "-o",
            "id",
            env=env,
            input=f"{PASSWORD}\nnot this line\n",
        )
    )
    assert created.stdout.strip().isdigit()
    assert created.stderr == ""
    token = ok(login_process(env, "ada@example.com")).stdout
    assert token.count(".") == 2 and token.endswith("\n") and token.count("\n") == 1
    assert ok(run_usermgr("verify", token.strip(), "-o", "email", env=env)).stdout == "ada@example.com\n"
    assert login_process(env, "ada@example.com", "not this line").returncode == 6
    shown = json.loads(ok(run_usermgr("show", created.stdout.strip(), "-o", "json", env=env)).stdout)
    assert shown["email"] == "ada@example.com"
    assert shown["last_login_at"].endswith("+00:00")


FIRST_LINES = {
    "email": "user00000@example.com\n",
    "id": "1\n",
    "csv": ",".join(CONTRACT_USER_FIELDS) + "\n",
    "jsonl": '{"id": 1, "uid": "',
    "json": "[\n",
    "table": "id ",
}


def test_list_into_head_ends_quietly(env: dict[str, str]) -> None:
    rows = "".join(json.dumps({"email": f"user{number:05d}@example.com"}) + "\n" for number in range(PIPED_USERS))
    ok(run_usermgr("import", "-", "--format", "jsonl", env=env, input=rows))
    for fmt, first_line in FIRST_LINES.items():
        pipeline = subprocess.run(
            ["bash", "-o", "pipefail", "-c", f'"$USERMGR" list -o {fmt} | head -1'],
            env={**os.environ, **env, "USERMGR": str(USERMGR)},
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
        )
        assert (fmt, pipeline.returncode, pipeline.stderr) == (fmt, 0, "")
        assert pipeline.stdout.startswith(first_line), (fmt, pipeline.stdout)
        assert pipeline.stdout.count("\n") == 1, fmt


def test_python_dash_m_usermgr() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "usermgr", "--help"], capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("Usage: ")
    assert "Example" in result.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "usermgr", "--bogus"], capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert unknown.returncode == 2
    assert unknown.stdout == ""
    assert unknown.stderr.startswith("usermgr: error: ") and unknown.stderr.count("\n") == 1


# ---- hidden prompts on a real terminal -----------------------------------------------------------


def test_create_asks_twice_on_a_terminal_without_echo(env: dict[str, str]) -> None:
    with on_terminal("create", "--email", "x@example.com", "-o", "email", env=env) as terminal:
        terminal.expect("Password: ")
        terminal.type(f"{PASSWORD}\n")
        terminal.expect("Repeat for confirmation: ")
        terminal.type(f"{PASSWORD}\n")
        terminal.expect("x@example.com\n")
        assert terminal.finish() == 0
    assert PASSWORD not in terminal.transcript  # the terminal did not echo it
    assert ok(login_process(env, "x@example.com")).stdout.count(".") == 2


def test_a_mismatched_confirmation_asks_again(env: dict[str, str]) -> None:
    with on_terminal("create", "--email", "x@example.com", "-o", "email", env=env) as terminal:
        terminal.expect("Password: ")
        terminal.type("first attempt here\n")
        terminal.expect("Repeat for confirmation: ")
        terminal.type("a typo in the second\n")
        terminal.expect("do not match")
        terminal.expect("Password: ")
        terminal.type(f"{PASSWORD}\n")
        terminal.expect("Repeat for confirmation: ")
        terminal.type(f"{PASSWORD}\n")
        assert terminal.finish() == 0
    assert terminal.transcript.count("Password: ") == 2
    assert login_process(env, "x@example.com", "first attempt here").returncode == 6
    assert ok(login_process(env, "x@example.com")).stdout.count(".") == 2


def test_a_weak_password_on_the_terminal_creates_nothing(env: dict[str, str]) -> None:
    with on_terminal("create", "--email", "x@example.com", env=env) as terminal:
        for prompt in ("Password: ", "Repeat for confirmation: "):
            terminal.expect(prompt)
            terminal.type("short\n")
        assert terminal.finish() == 3
    assert "usermgr: error: password too short" in terminal.transcript
    assert "Traceback" not in terminal.transcript
    assert emails(Runner(env)) == []


def test_ctrl_c_at_the_prompt_changes_nothing(env: dict[str, str]) -> None:
    with on_terminal("create", "--email", "x@example.com", env=env) as terminal:
        terminal.expect("Password: ")
        terminal.type("\x03")
        assert terminal.finish() == 130
    assert "usermgr: error: interrupted; nothing was changed" in terminal.transcript
    assert "Traceback" not in terminal.transcript
    assert emails(Runner(env)) == []


def test_a_terminal_test_works_in_a_worker_with_a_thousand_files_open(env: dict[str, str]) -> None:
    """A test worker once held over 1,024 descriptors (engines waiting for the collector), and
    the pseudo-terminal's number was past what `select()` takes: nine terminal tests failed."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with on_terminal("create", "--email", "x@example.com", env=env) as terminal:
            terminal.expect("Password: ")
            terminal.type("\x03")
            assert terminal.finish() == 130
    finally:
        for fd in held:
            os.close(fd)
    assert emails(Runner(env)) == []


def test_set_password_on_a_terminal(env: dict[str, str]) -> None:
    ok(run_usermgr("create", "--email", "x@example.com", "--no-password", env=env))
    with on_terminal("set-password", "x@example.com", env=env) as terminal:
        for prompt in ("Password: ", "Repeat for confirmation: "):
            terminal.expect(prompt)
            terminal.type(f"{PASSWORD}\n")
        assert terminal.finish() == 0
    assert PASSWORD not in terminal.transcript
    assert ok(login_process(env, "x@example.com")).stdout.count(".") == 2


def test_delete_asks_on_a_terminal(env: dict[str, str]) -> None:
    for email in ("x@example.com", "y@example.com"):
        ok(run_usermgr("create", "--email", email, "--no-password", env=env))
    for answer, remaining in (("n", ["x@example.com", "y@example.com"]), ("y", ["y@example.com"])):
        with on_terminal("delete", "x@example.com", env=env) as terminal:
            terminal.expect("Delete 1 user? [y/N]: ")
            terminal.type(f"{answer}\n")
            assert terminal.finish() == 0
        assert emails(Runner(env)) == remaining
        assert ("nothing was deleted" in terminal.transcript) == (answer == "n")
        assert ("deleted 1 user" in terminal.transcript) == (answer == "y")


# ---- --debug -------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to provoke an unexpected error")
def test_debug_shows_a_traceback_only_when_asked(env: dict[str, str]) -> None:
    """A full disk under standard output is an error no rule of usermgr expects."""
    ok(run_usermgr("create", "--email", "x@example.com", "--no-password", env=env))

    def show(*options: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        with open("/dev/full", "w") as full:
            return subprocess.run(
                [str(USERMGR), *options, "show", "x@example.com"],
                env={**os.environ, **env, **(extra or {})},
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                timeout=HANG_TIMEOUT,
            )

    quiet = show()
    assert quiet.returncode == 1
    assert quiet.stderr == "usermgr: error: cannot read or write: No space left on device\n"
    for loud in (show("--debug"), show(extra={"USERMGR_DEBUG": "1"})):
        assert loud.returncode == 1
        assert loud.stderr.startswith("Traceback (most recent call last):")
        assert "OSError: [Errno 28]" in loud.stderr


@pytest.mark.parametrize("debug", [["--debug"], []], ids=["--debug", "USERMGR_DEBUG=1"])
def test_debug_keeps_the_exit_codes_of_expected_errors(env: dict[str, str], debug: list[str]) -> None:
    result = run_usermgr(*debug, "show", "ghost@example.com", env={**env, "USERMGR_DEBUG": "0" if debug else "1"})
    assert result.returncode == 4
    assert result.stderr.startswith("usermgr: error: no user matches")
    assert "Traceback" not in result.stderr


BLOCK_API_EXTRA = """
import sys
from importlib.abc import MetaPathFinder


class NoApiExtra(MetaPathFinder):
    # As if the `api` extra were not installed: fastapi and uvicorn cannot be imported.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoApiExtra())
from usermgr.cli import main

main(sys.argv[1:])
"""


@pytest.mark.e2e
def test_serve_without_the_api_extra_says_how_to_install_it(env: dict[str, str]) -> None:
    full_env = process_env(env)
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_API_EXTRA, "serve", "--port", "1"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "usermgr: error: the HTTP API needs the `api` extra: pip install 'usermgr[api]'\n"
    listed = subprocess.run(
        [sys.executable, "-c", BLOCK_API_EXTRA, "list", "-o", "id"], env=full_env, capture_output=True, text=True
    )
    assert (listed.returncode, listed.stderr) == (0, "")  # nothing else breaks
