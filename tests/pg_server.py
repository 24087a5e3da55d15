"""A throwaway PostgreSQL server for the test session.

``PostgresServer().start()`` runs ``initdb`` into a fresh temporary directory, starts the
server with ``pg_ctl`` on a free port of 127.0.0.1 only (its Unix socket stays inside that
directory), and returns a SQLAlchemy URL for the superuser ``usermgr`` and its database
``usermgr``. ``stop()`` kills the server and removes the directory; it is safe to call twice
and also runs at interpreter exit, so no server outlives the test session.

Durability is switched off (fsync, synchronous_commit, full_page_writes): the data is
thrown away anyway. initdb refuses to run as root, so as root every server command runs as
the ``postgres`` system user (else ``nobody``) through ``runuser``.

Only the standard library is needed, plus psycopg for the readiness check and for the
CREATE/DROP DATABASE helpers.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import quote

if TYPE_CHECKING:
    import psycopg

ROLE = "usermgr"
DATABASE = "usermgr"
HOST = "127.0.0.1"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
START_ATTEMPTS = 5  # a fresh port each time, in case another process took the one we picked
# Guards against a hang only, never budgets: a loaded machine may take minutes to start a server.
SERVER_WAIT = 240  # seconds pg_ctl waits for the server to start or stop (-t)
READY_TIMEOUT = 240.0
COMMAND_TIMEOUT = 300.0  # longer than SERVER_WAIT, so that pg_ctl reports before it is killed
LOG_TAIL_LINES = 40

SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
}


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: from PATH first, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found is not None:
        initdb = Path(found)
        # Prefer the real directory (PATH often holds symlinks, e.g. /usr/local/bin/initdb).
        for candidate in (initdb.resolve().parent, initdb.parent):
            if _has_binaries(candidate):
                return candidate
    versions: list[tuple[tuple[int, ...], Path]] = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        version = candidate.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version) and _has_binaries(candidate):
            versions.append((tuple(int(part) for part in version.split(".")), candidate))
    if not versions:
        return None
    return max(versions)[1]


def _has_binaries(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("initdb", "pg_ctl"))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, but there is neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


def _as_user(user: pwd.struct_passwd, command: list[str]) -> list[str]:
    """``command`` run as ``user`` (from root), through runuser, setpriv or su, whichever exists."""
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--", *command]
    if shutil.which("setpriv"):
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
            *command,
        ]
    if shutil.which("su"):
        return ["su", "-s", "/bin/sh", user.pw_name, "-c", shlex.join(command)]
    raise RuntimeError("running as root, but none of runuser, setpriv or su is there to drop privileges for PostgreSQL")


def _make_traversable(directory: Path) -> None:
    """Lets other users pass through ``directory`` and its parents (adds o+x where it is missing)."""
    for path in [directory, *directory.parents]:
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)


class PostgresServer:
    """A PostgreSQL server in a temporary directory, for as long as the test session needs it.

    Use ``start()``/``stop()``, or ``with PostgresServer() as server: ... server.url ...``.
    """

    def __init__(self) -> None:
        self.bin_dir: Path | None = None
        self.base_dir: Path | None = None
        self.port: int | None = None
        self._user: pwd.struct_passwd | None = None
        self._owner_pid: int | None = None
        self._running = False

    # -- paths and URLs ------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def log_file(self) -> Path:
        return self._base() / "server.log"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``usermgr`` database."""
        return self.url_of(DATABASE)

    def url_of(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name`` on this server, as the ``usermgr`` superuser."""
        if self.port is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return f"postgresql+psycopg://{ROLE}@{HOST}:{self.port}/{quote(name, safe='')}"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return self.base_dir

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> str:
        """Creates and starts the server; returns the SQLAlchemy URL of its ``usermgr`` database."""
        if self._running:
            return self.url
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(
                "PostgreSQL server binaries (initdb, pg_ctl) are missing: neither on PATH nor in "
                "/usr/lib/postgresql/*/bin. Install them (Debian/Ubuntu: apt-get install postgresql) "
                "or point USERMGR_TEST_POSTGRES_URL at a server."
            )
        self.bin_dir = bin_dir
        self._user = _unprivileged_user() if os.geteuid() == 0 else None
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            self._create_base_dir()
            self._initdb()
            self._start_server()
            self._running = True
            self._wait_until_ready()
            with self._connect("postgres") as connection:
                connection.execute(f'CREATE DATABASE "{DATABASE}"')
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Kills the server (``pg_ctl -m immediate stop``) and removes its directory. Safe to call twice."""
        atexit.unregister(self._stop_at_exit)
        base_dir, self.base_dir = self.base_dir, None
        running, self._running = self._running, False
        self.port = None
        if base_dir is None:
            return
        data_dir = base_dir / "data"
        if running or (data_dir / "postmaster.pid").exists():
            subprocess.run(
                self._command("pg_ctl", "stop", "-D", str(data_dir), "-m", "immediate", "-w", "-t", str(SERVER_WAIT)),
                cwd=base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        shutil.rmtree(base_dir, ignore_errors=True)

    def _stop_at_exit(self) -> None:
        # A forked child (multiprocessing) inherits the atexit hook: only the starting process stops the server.
        if os.getpid() == self._owner_pid:
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its SQLAlchemy URL."""
        from psycopg import sql

        with self._connect("postgres") as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_of(name)

    def drop_database(self, name: str) -> None:
        """Terminates the connections to database ``name``, then drops it (if it exists)."""
        from psycopg import sql

        with self._connect("postgres") as connection:
            connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    # -- internals -----------------------------------------------------------------------

    def _command(self, program: str, *args: str) -> list[str]:
        if self.bin_dir is None:
            raise RuntimeError("the PostgreSQL server is not started")
        command = [str(self.bin_dir / program), *args]
        return command if self._user is None else _as_user(self._user, command)

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._command(program, *args),
            cwd=self._base(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def _create_base_dir(self) -> None:
        # Under /tmp: short (the Unix socket path is limited to ~100 bytes) and reachable by the server user.
        parent = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
        base_dir = Path(tempfile.mkdtemp(prefix="usermgr-pg-", dir=parent))
        self.base_dir = base_dir
        if self._user is not None:
            _make_traversable(parent)
            os.chown(base_dir, self._user.pw_uid, self._user.pw_gid)

    def _initdb(self) -> None:
        result = self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            f"--username={ROLE}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
        settings = {**SETTINGS, "unix_socket_directories": f"'{self._base()}'"}
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tests/pg_server.py: a throwaway server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_server(self) -> None:
        failure = ""
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            log_size = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._run(
                "pg_ctl",
                "start",
                "-w",
                "-t",
                str(SERVER_WAIT),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port}",
            )
            if result.returncode == 0:
                return
            failure = f"pg_ctl start failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
            if "already in use" not in self._log_tail(since=log_size):
                break
        raise RuntimeError(f"{failure}\n--- {self.log_file} (tail) ---\n{self._log_tail()}")

    def _log_tail(self, since: int = 0) -> str:
        """The last lines of the server log (from byte ``since`` on)."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(since)
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except OSError as error:
            return f"(no server log: {error})"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def _connect(self, dbname: str) -> psycopg.Connection[tuple[object, ...]]:
        import psycopg

        return psycopg.connect(
            host=HOST, port=self.port, user=ROLE, dbname=dbname, autocommit=True, connect_timeout=SERVER_WAIT
        )

    def _wait_until_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                with self._connect("postgres") as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the PostgreSQL server on {HOST}:{self.port} does not accept connections: {error}\n"
                        f"--- {self.log_file} (tail) ---\n{self._log_tail()}"
                    ) from error
                time.sleep(0.1)
