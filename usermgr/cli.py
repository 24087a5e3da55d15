"""The admin CLI: parse input, call the service, render output. No rule lives here.

Start-up time matters (`usermgr verify` in a loop, `--help`): this module imports only
click and usermgr's stdlib-only modules; each command imports the service when it runs.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from usermgr import __version__, errors, output
from usermgr.config import KEY_ALGORITHMS, Settings, env_flag, load_settings, parse_duration
from usermgr.contract import ADMIN_ROLE, EVENT_FIELDS, USER_FIELDS, USER_RECORD
from usermgr.lazy import lazy_module

# The one place the heavy modules are loaded: each on its first use, so that `usermgr
# --help` and offline `usermgr verify` never import SQLAlchemy, pydantic or passlib.
if TYPE_CHECKING:
    from sqlalchemy import URL, Engine
    from sqlalchemy.orm import Session

    from usermgr import database, keyring, migrations, service, tokens
else:
    database = lazy_module("usermgr.database")
    keyring = lazy_module("usermgr.keyring")
    migrations = lazy_module("usermgr.migrations")
    service = lazy_module("usermgr.service")
    tokens = lazy_module("usermgr.tokens")

WHEN = "an ISO 8601 date (its start, UTC) or date and time (UTC without an offset), or a duration from now (90d)"
CLAIM_FIELDS = ("sub", "email", "roles", "iss", "aud", "iat", "exp", "jti", "ver")
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# ---- errors and the process boundary -------------------------------------------------


def note(message: str) -> None:
    """A message for the person or the log: standard error, never standard output."""
    click.echo(f"usermgr: {message}", err=True)


def fail(message: str, code: int) -> NoReturn:
    """Report an error, one `usermgr: error:` line per line of the message, and exit."""
    for line in message.splitlines() or [""]:
        click.echo(f"usermgr: error: {line}", err=True)
    sys.exit(code)


def _silence_stdout() -> None:
    """After the reader of a pipe went away, send what is left nowhere, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _domain_error(error: BaseException, app: App | None) -> errors.UsermgrError | None:
    if isinstance(error, errors.UsermgrError):
        return error
    if "sqlalchemy" in sys.modules:  # else no database was ever touched: not a database error
        return database.as_domain_error(error, app.database_url if app is not None else None)
    return None


class UsermgrGroup(click.Group):
    """Turns every failure into one line on stderr and its exit code, usage errors too."""

    def main(  # type: ignore[override]  # always standalone: the overloads' bool variant never applies
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        try:
            code = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(error.ctx.get_help() if error.ctx else "", err=True)
            sys.exit(2)
        except click.exceptions.UsageError as error:
            command = error.ctx.command_path if error.ctx else "usermgr"
            fail(f"{error.format_message()} (see `{command} --help`)", 2)
        except click.ClickException as error:
            fail(error.format_message(), error.exit_code)
        except click.exceptions.Abort:
            click.echo("", err=True)
            fail("interrupted; nothing was changed", 130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            _silence_stdout()
            sys.exit(0)
        except Exception as error:  # the one place that keeps tracebacks from users
            domain = _domain_error(error, ctx.find_object(App))
            if domain is not None:
                fail(str(domain), errors.exit_code(domain))
            if _debug(ctx):
                raise
            if isinstance(error, OSError):
                fail(f"cannot read or write: {error.strerror or error}", errors.UNEXPECTED_EXIT_CODE)
            fail(
                f"unexpected {type(error).__name__}: {error} (a bug: run again with --debug and report the traceback)",
                errors.UNEXPECTED_EXIT_CODE,
            )


def _debug(ctx: click.Context) -> bool:
    app = ctx.find_object(App)
    if app is not None and app.options.get("debug"):
        return True
    return env_flag("USERMGR_DEBUG")


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: `usermgr` and `python -m usermgr`."""
    cli.main(args=argv, prog_name="usermgr")


# ---- the application object -------------------------------------------------------------


class App:
    """Global options, with settings and the database opened only when a command needs them."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._settings: Settings | None = None
        self._database: database.Database | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(
                database_url=self.options.get("db"),
                key_file=self.options.get("key_file"),
                debug=bool(self.options.get("debug")),
            )
        return self._settings

    @property
    def database_url(self) -> URL | None:
        """The URL of the database this process opened, if it opened one."""
        return self._database.engine.url if self._database is not None else None

    def _opened(self, must_exist: bool) -> database.Database:
        if self._database is None:
            self._database = database.Database(self.settings.database_url, must_exist=must_exist)
        return self._database

    def session(self, *, must_exist: bool = True) -> Session:
        """A session on the database of `--db`, opened once per process on first use."""
        return self._opened(must_exist).SessionLocal()

    def engine(self, *, must_exist: bool = True) -> Engine:
        """The engine of the database of `--db` (for migrations)."""
        return self._opened(must_exist).engine


pass_app = click.make_pass_decorator(App)


# ---- shared options and input -----------------------------------------------------------


def output_option(formats: Sequence[str] = output.USER_FORMATS, default: str | None = "table") -> Callable[..., Any]:
    return click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice(formats),
        default=default,
        show_default=default is not None,
        help="Output format; scripts should always say which.",
    )


def password_stdin_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--password-stdin", is_flag=True, help="Read the password from the first line of standard input."
    )(command)


def users_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("users", nargs=-1, required=True, metavar="USER...")(command)


def read_user_refs(values: Sequence[str]) -> tuple[list[str | None], str]:
    """The USER arguments, or with `-` the lines of standard input; and what a position is.

    A blank line of input becomes None: it names no one, but keeps the line numbers right.
    """
    if "-" not in values:
        return list(values), "argument"
    if len(values) > 1:
        raise click.UsageError("`-` reads users from standard input and cannot be mixed with other users")
    return [line.strip() or None for line in stdin_lines()], "line"


def stdin_lines() -> Iterator[str]:
    """Standard input's lines as they come. Bytes that are not UTF-8 are kept as lone
    surrogates, which match no user and no token: such a line gets its own answer (not
    found, malformed) with its line number instead of ending the command."""
    return iter(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape"))


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def read_password(from_stdin: bool, *, confirm: bool, command: str) -> str:
    """A password from a hidden prompt on a terminal, or from standard input's first line."""
    if from_stdin:
        line = sys.stdin.buffer.readline()
        if not line:
            raise errors.InvalidInput("no password on standard input")
        try:
            return line.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            # Said before any user is looked up: the same answer for a known and an unknown one.
            raise errors.InvalidInput("the password on standard input is not UTF-8 text") from None
    if not stdin_is_terminal():
        raise click.UsageError(
            f"no terminal to ask for the password on: pipe it in with `usermgr {command} --password-stdin`"
        )
    return click.prompt("Password", hide_input=True, confirmation_prompt=confirm)


def show_user(user: Any, fmt: str) -> None:
    output.write_one(service.user_record(user), fmt, USER_FIELDS)


def summarize(verb: str, users: Sequence[Any]) -> None:
    note(f"{verb} {len(users)} user{'s' if len(users) != 1 else ''}")


# ---- the group ----------------------------------------------------------------------------


@click.group(cls=UsermgrGroup, context_settings=CONTEXT_SETTINGS, epilog=f"Exit codes: {errors.exit_code_summary()}.")
@click.option(
    "--db", envvar="USERMGR_DATABASE_URL", metavar="URL", help="Database URL or SQLite path [default: users.db]."
)
@click.option(
    "--key-file",
    envvar="USERMGR_KEY_FILE",
    type=click.Path(dir_okay=False),
    help="Token signing key [default: usermgr.key beside a SQLite database].",
)
@click.option("--debug", is_flag=True, envvar="USERMGR_DEBUG", help="Show tracebacks of unexpected errors.")
@click.version_option(__version__, prog_name="usermgr")
@click.pass_context
def cli(ctx: click.Context, db: str | None, key_file: str | None, debug: bool) -> None:
    """Manage the users table of a web app: users, roles, passwords and tokens.

    \b
    Example:
      usermgr init
      usermgr create --email ada@example.com --admin
      usermgr list -o email | head -1
    """
    ctx.obj = App(db=db, key_file=key_file, debug=debug)


@cli.command()
@pass_app
def init(app: App) -> None:
    """Create or upgrade the schema, and create the key file (mode 0600) if missing.

    Idempotent: safe to run on every deploy.

    \b
    Example:
      usermgr --db users.db init
    """
    settings = app.settings
    engine = app.engine(must_exist=False)
    migrations.upgrade(engine)
    note(
        f"database {engine.url.render_as_string(hide_password=True)}"
        f" is at schema revision {migrations.current_revision(engine)}"
    )
    _report_unreachable_usernames(app)
    if settings.key_file is None:
        note("no key file for this database: set USERMGR_SECRET_KEY or give --key-file to sign tokens")
    elif tokens.create_key_file(settings.key_file, settings.token_algorithm):
        note(f"created key file {settings.key_file} (mode 0600)")


UNREACHABLE_EXAMPLES = 5


def _report_unreachable_usernames(app: App) -> None:
    with app.session() as db:
        count, examples = service.unreachable_usernames(db, UNREACHABLE_EXAMPLES)
    if count:
        shown = ", ".join(f"id {user_id} ({errors.cut_repr(username)})" for user_id, username in examples)
        more = f" and {count - len(examples)} more" if count > len(examples) else ""
        note(
            f"warning: {count} username{'s' if count != 1 else ''} no USER argument can name (all digits reads as"
            f" an id, an @ as an email; spaces around are dropped): {shown}{more}; name each user by id,"
            " and rename with `usermgr update ID --username NEW`"
        )


@cli.command()
@click.option("--email", required=True, help="Email address (stored lowercased).")
@click.option("--username", help="Optional unique username.")
@click.option("--full-name", help="Optional display name.")
@click.option("--admin", is_flag=True, help="Grant the built-in admin role.")
@click.option("--role", "roles", multiple=True, metavar="ROLE", help="Grant a role (repeatable).")
@click.option(
    "--expires",
    metavar="WHEN",
    help=f"The account cannot log in from WHEN on (in the future): {WHEN} [default: never].",
)
@password_stdin_option
@click.option("--no-password", is_flag=True, help="Create without a password: the user cannot log in yet.")
@output_option()
@pass_app
def create(
    app: App,
    email: str,
    username: str | None,
    full_name: str | None,
    admin: bool,
    roles: tuple[str, ...],
    expires: str | None,
    password_stdin: bool,
    no_password: bool,
    fmt: str,
) -> None:
    """Add a user. The password comes from a hidden prompt or standard input, never argv.

    \b
    Example:
      usermgr create --email ada@example.com --admin
      printf '%s\\n' "$PW" | usermgr create --email bob@example.com --password-stdin -o id
      usermgr create --email contractor@example.com --expires 2027-03-31 --no-password
    """
    if password_stdin and no_password:
        raise click.UsageError("--password-stdin and --no-password cannot be used together")
    expires_at = service.expiry(expires) if expires is not None else None
    with app.session() as db:
        # Before the prompt: a mistake is said before anyone types a password.
        service.check_new_user(db, service.new_user(email, username, full_name), roles=roles, expires_at=expires_at)
        if not password_stdin and not no_password and not stdin_is_terminal():
            raise click.UsageError(
                "no terminal to ask for the password on: "
                "use --password-stdin to read it from standard input, or --no-password"
            )
        password = None if no_password else read_password(password_stdin, confirm=True, command="create")
        data = service.new_user(email, username, full_name, password)
        user = service.create_user(db, app.settings, data, roles=roles, admin=admin, expires_at=expires_at)
    show_user(user, fmt)


@cli.command()
@click.argument("user")
@output_option()
@pass_app
def show(app: App, user: str, fmt: str) -> None:
    """Show one user, by email, username or id.

    \b
    Example:
      usermgr show ada@example.com -o json
    """
    with app.session() as db:
        show_user(service.get_user(db, user), fmt)


@cli.command("list")
@click.option("--role", help="Only users with this role.")
@click.option("--admin", is_flag=True, help="Only admins.")
@click.option("--active/--disabled", "active", default=None, help="Only enabled, or only disabled, users.")
@click.option("--locked", is_flag=True, help="Only users locked out by failed logins right now.")
@click.option("--expired", is_flag=True, help="Only users whose account expiry has passed.")
@click.option(
    "--expires-before", metavar="T", help=f"Only users whose account expires before T (expired ones too): {WHEN}."
)
@click.option("--search", metavar="TEXT", help="Only users whose email, username or name contains TEXT.")
@click.option("--limit", type=click.IntRange(min=0), help="At most N users.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip the first N users.")
@output_option()
@pass_app
def list_users(
    app: App,
    role: str | None,
    admin: bool,
    active: bool | None,
    locked: bool,
    expired: bool,
    expires_before: str | None,
    search: str | None,
    limit: int | None,
    offset: int,
    fmt: str,
) -> None:
    """List users, oldest first, streamed.

    \b
    Example:
      usermgr list --role beta -o email | usermgr disable -
      usermgr list --expires-before 30d -o email
    """
    before = (
        service.expiry(expires_before, what="--expires-before", never=False) if expires_before is not None else None
    )
    filters = service.UserFilter(
        role=role,
        admin=admin,
        active=active,
        locked=locked,
        expired=expired,
        expires_before=before,
        search=search,
        limit=limit,
        offset=offset,
    )
    with app.session() as db:
        output.write_rows(service.iter_user_rows(db, filters, stored=True), fmt, USER_FIELDS, types=USER_RECORD)


@cli.command()
@click.argument("user")
@click.option("--email", help="New email.")
@click.option("--username", help="New username.")
@click.option("--full-name", help="New display name.")
@click.option(
    "--expires",
    metavar="WHEN",
    help=f"The account cannot log in from WHEN on: {WHEN}; a past time ends logins now; never clears it.",
)
@output_option()
@pass_app
def update(
    app: App, user: str, email: str | None, username: str | None, full_name: str | None, expires: str | None, fmt: str
) -> None:
    """Change profile fields and the account's expiry; only those given change.

    Expiry is not disable: `enable` leaves it, `--expires never` clears it.

    \b
    Example:
      usermgr update ada@example.com --full-name "Ada King"
      usermgr update bob@example.com --expires 90d
    """
    changes = service.user_changes(email=email, username=username, full_name=full_name, expires=expires)
    with app.session() as db:
        show_user(service.update_user(db, user, changes), fmt)


@cli.command("set-password")
@click.argument("user")
@password_stdin_option
@pass_app
def set_password(app: App, user: str, password_stdin: bool) -> None:
    """Set a new password; every token issued before it stops working.

    \b
    Example:
      printf '%s\\n' "$PW" | usermgr set-password ada@example.com --password-stdin
    """
    with app.session() as db:
        service.get_user(db, user)  # an unknown user fails before a password is asked for
        password = read_password(password_stdin, confirm=True, command="set-password")
        service.set_password(db, app.settings, user, password)
    note("password changed; earlier tokens are revoked")


def _batch(
    app: App, users: tuple[str, ...], verb: str, change: Callable[[Session, list[str | None], str], Any]
) -> None:
    """Run one change over the USERs given (or read from stdin) in one transaction, and say so."""
    refs, origin = read_user_refs(users)
    with app.session() as db:
        summarize(verb, change(db, refs, origin))


@cli.command()
@users_argument
@pass_app
def disable(app: App, users: tuple[str, ...]) -> None:
    """Block login for USERs and end their tokens; `-` reads them from stdin.

    The last active admin cannot be disabled.

    \b
    Example:
      usermgr list --role beta -o email | usermgr disable -
    """
    _batch(app, users, "disabled", lambda db, refs, origin: service.set_active(db, refs, False, origin))


@cli.command()
@users_argument
@pass_app
def enable(app: App, users: tuple[str, ...]) -> None:
    """Allow USERs to log in again; `-` reads them from stdin. A lock stays until `unlock`.

    \b
    Example:
      usermgr enable ada@example.com 42
    """
    _batch(app, users, "enabled", lambda db, refs, origin: service.set_active(db, refs, True, origin))


@cli.command()
@users_argument
@pass_app
def unlock(app: App, users: tuple[str, ...]) -> None:
    """Clear the failed-login lock of USERs; `-` reads them from stdin.

    \b
    Example:
      usermgr unlock ada@example.com
    """
    _batch(app, users, "unlocked", service.unlock)


@cli.command("grant-admin")
@users_argument
@pass_app
def grant_admin(app: App, users: tuple[str, ...]) -> None:
    """Give USERs the built-in admin role; `-` reads them from stdin.

    \b
    Example:
      usermgr grant-admin ada@example.com
    """
    _batch(app, users, "granted admin to", lambda db, refs, origin: service.grant_role(db, refs, ADMIN_ROLE, origin))


@cli.command("revoke-admin")
@users_argument
@pass_app
def revoke_admin(app: App, users: tuple[str, ...]) -> None:
    """Take the admin role from USERs; the last active admin keeps it.

    \b
    Example:
      usermgr revoke-admin bob@example.com
    """
    _batch(app, users, "revoked admin from", lambda db, refs, origin: service.revoke_role(db, refs, ADMIN_ROLE, origin))


@cli.command("revoke-tokens")
@users_argument
@pass_app
def revoke_tokens(app: App, users: tuple[str, ...]) -> None:
    """End every token issued to USERs so far; `-` reads them from stdin.

    \b
    Example:
      usermgr revoke-tokens ada@example.com
    """
    _batch(app, users, "revoked the tokens of", service.revoke_tokens)


@cli.command()
@users_argument
@click.option("--yes", "-y", is_flag=True, help="Do not ask to confirm.")
@pass_app
def delete(app: App, users: tuple[str, ...], yes: bool) -> None:
    """Remove USERs; asks to confirm unless --yes. The last active admin stays.

    \b
    Example:
      usermgr delete bob@example.com --yes
    """
    if not yes and not stdin_is_terminal():
        raise click.UsageError("no terminal to confirm on: add --yes to delete without asking")
    refs, origin = read_user_refs(users)
    if not yes and not click.confirm(f"Delete {len(refs)} user{'s' if len(refs) != 1 else ''}?", err=True):
        note("nothing was deleted")
        return
    with app.session() as db:
        summarize("deleted", service.delete_users(db, refs, origin))


@cli.command("grant-role")
@users_argument
@click.argument("role")
@pass_app
def grant_role(app: App, users: tuple[str, ...], role: str) -> None:
    """Give USERs the named ROLE (created on first use).

    \b
    Example:
      usermgr grant-role ada@example.com bob@example.com beta
      usermgr list --search @corp.example -o id | usermgr grant-role - staff
    """
    _batch(app, users, f"granted role {role!r} to", lambda db, refs, origin: service.grant_role(db, refs, role, origin))


@cli.command("revoke-role")
@users_argument
@click.argument("role")
@pass_app
def revoke_role(app: App, users: tuple[str, ...], role: str) -> None:
    """Take the named ROLE from USERs; a user without it is left as it is.

    \b
    Example:
      usermgr revoke-role bob@example.com beta
    """
    _batch(
        app, users, f"revoked role {role!r} from", lambda db, refs, origin: service.revoke_role(db, refs, role, origin)
    )


@cli.command()
@output_option(output.DATA_FORMATS)
@pass_app
def roles(app: App, fmt: str) -> None:
    """List roles with their member counts.

    \b
    Example:
      usermgr roles -o csv
    """
    with app.session() as db:
        output.write_records(service.list_roles(db), fmt, ("name", "members"))


@cli.command()
@click.argument("user")
@password_stdin_option
@click.option(
    "--ttl", metavar="DURATION", help="Token lifetime, such as 90s, 15m, 8h, 7d [default: USERMGR_TOKEN_TTL, 1h]."
)
@pass_app
def login(app: App, user: str, password_stdin: bool, ttl: str | None) -> None:
    """Check USER's password and print only the access token, one line.

    \b
    Example:
      TOKEN=$(printf '%s\\n' "$PW" | usermgr login ada@example.com --password-stdin)
    """
    lifetime = parse_duration(ttl, what="--ttl") if ttl is not None else None
    password = read_password(password_stdin, confirm=False, command="login")
    with app.session() as db:
        token = service.login(db, app.settings, user, password, lifetime)
    click.echo(token)


@cli.command()
@click.argument("tokens", nargs=-1, metavar="[TOKEN... | -]")
@click.option("--role", help="Also require this role (exit 8 without it).")
@click.option(
    "--check-db",
    is_flag=True,
    help="Also check the user exists, is enabled, unlocked and unexpired, and has not revoked the token.",
)
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False, exists=True),
    help="Verify with this PEM public key only (Ed25519, P-256 or RSA): no key ring needed.",
)
@click.option(
    "--jwks",
    type=click.Path(dir_okay=False, exists=True),
    help="Verify with this public JWK Set (`usermgr keys export`, or the API's /.well-known/jwks.json).",
)
@output_option(output.USER_FORMATS, default=None)
@pass_app
def verify(
    app: App,
    tokens: tuple[str, ...],
    role: str | None,
    check_db: bool,
    public_key: str | None,
    jwks: str | None,
    fmt: str | None,
) -> None:
    """Check tokens offline: signature, expiry, issuer, audience and role.

    Exit 0 when every token is valid, 7 when any is invalid, else 8 when any lacks the
    role. `-` reads one token a line and prints one result a line [default -o jsonl];
    a single token prints its claims [default -o table].

    \b
    Example:
      usermgr verify "$TOKEN" --role admin >/dev/null && echo "admin"
      cat tokens.txt | usermgr verify - -o jsonl
      usermgr verify --jwks jwks.json "$TOKEN"
    """
    if public_key and jwks:
        raise click.UsageError("--public-key and --jwks cannot be used together")
    if not tokens:
        if stdin_is_terminal():
            raise click.UsageError("give a TOKEN, or `-` to read tokens from standard input")
        tokens = ("-",)
    if "-" in tokens and len(tokens) > 1:
        raise click.UsageError("`-` reads tokens from standard input and cannot be mixed with other tokens")
    with TokenChecker(app, role=role, check_db=check_db, public_key=public_key, jwks=jwks) as checker:
        if tokens == ("-",):
            code = _verify_stream(checker, (line.rstrip("\r\n") for line in stdin_lines()), fmt or "jsonl")
        else:
            code = _verify_each(checker, tokens, fmt or "table")
    sys.exit(code)


class TokenChecker:
    """Checks tokens the way `verify` was asked to: offline, or also against the database."""

    def __init__(self, app: App, *, role: str | None, check_db: bool, public_key: str | None, jwks: str | None) -> None:
        self.settings = app.settings
        self.role = role
        self.keys = tokens.verification_keys(
            self.settings, Path(public_key) if public_key else None, Path(jwks) if jwks else None
        )
        self.db = app.session() if check_db else None

    def __enter__(self) -> TokenChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.db is not None:
            self.db.close()

    def claims(self, token: str) -> dict[str, Any]:
        """The token's claims; TokenInvalid or Forbidden when it does not pass."""
        if self.db is None:
            return tokens.decode_token(token, self.settings, self.keys, required_role=self.role)
        return service.holder_of_token(
            self.db, self.settings, token, self.keys, required_role=self.role, role_in_token=True
        )[0]


def _failure_code(error: errors.UsermgrError, worst: int) -> int:
    code = errors.exit_code(error)
    return code if worst == 0 or code == errors.exit_code(errors.TokenInvalid()) else worst


def _verify_each(checker: TokenChecker, tokens: Sequence[str], fmt: str) -> int:
    worst = 0
    for token in tokens:
        try:
            claims = checker.claims(token)
        except (errors.TokenInvalid, errors.Forbidden) as error:
            click.echo(f"usermgr: error: {error}", err=True)
            worst = _failure_code(error, worst)
            continue
        _unless_nobody_reads(partial(output.write_one, _claims_record(claims), fmt, CLAIM_FIELDS))
    return worst


def _unless_nobody_reads(write: Callable[[], object]) -> None:
    """Write to standard output; when its reader has gone (`| head -1`), go on with nowhere to
    write: `verify`'s exit code answers for every token, so the rest must still be checked
    (the quiet exit 0 of other commands would pass unchecked tokens as valid)."""
    try:
        write()
    except BrokenPipeError:
        _silence_stdout()


def _claims_record(claims: dict[str, Any]) -> dict[str, Any]:
    """Claims as a record that `-o email` and `-o id` can print (`id` is the subject)."""
    return {**claims, "id": claims.get("sub")}


RESULT_FIELDS = ("valid", "reason", "claims")
FLAT_RESULT_FIELDS = ("valid", "reason", "sub", "email", "roles", "exp")


def _verify_stream(checker: TokenChecker, lines: Any, fmt: str) -> int:
    """One result a line, in the order of the input; the worst exit code wins."""
    worst = 0
    seen = 0

    def results() -> Any:
        nonlocal worst, seen
        for line in lines:
            seen += 1
            try:
                claims = checker.claims(line)
            except (errors.TokenInvalid, errors.Forbidden) as error:
                worst = _failure_code(error, worst)
                if fmt in ("email", "id"):
                    continue
                yield {"valid": False, "reason": str(error), "claims": None}
                continue
            yield {"valid": True, "reason": None, "claims": claims, **_claims_record(claims)}

    fields = RESULT_FIELDS if fmt in ("json", "jsonl") else FLAT_RESULT_FIELDS
    records = results()
    _unless_nobody_reads(partial(output.write_records, records, fmt, fields))
    for _unread in records:  # the reader left early: the lines after still count
        pass
    if seen == 0:  # `verify "$EMPTY" && allow` must never allow
        click.echo("usermgr: error: token invalid: no token on standard input", err=True)
        return errors.exit_code(errors.TokenInvalid())
    return worst


# ---- the key ring: `usermgr keys` -------------------------------------------------------------

KEY_FIELDS = ("kid", "alg", "state", "created", "fingerprint")
KID_ARGUMENTS = {"ignore_unknown_options": True, "help_option_names": ["--help"]}
"""A kid (a base64url thumbprint) may start with `-`: `keys retire "$KID"` must take it as the
KID, not as options (`-Jdash` would otherwise hold `-h`, the help)."""
alg_option = click.option(
    "--alg",
    type=click.Choice(KEY_ALGORITHMS),
    help="The new key's algorithm [default: USERMGR_TOKEN_ALGORITHM, else HS256].",
)


@cli.group(cls=click.Group)
def keys() -> None:
    """The key ring: list, add, activate, rotate, retire and export signing keys.

    \b
    States: next (published, not signing), active (signs; exactly one),
    retiring (verifies, no longer signs). A retired key is removed: tokens it
    signed fail with "unknown key" (exit 7). README, Keys, has the rotation timeline.

    \b
    Example:
      usermgr keys rotate --alg ES256
      usermgr keys export > jwks.json
    """


def _change_keys(app: App, edit: Any) -> list[Any]:
    """Apply a change to the key ring file and report each key that changed: the one place
    that knows "a key changed: action, kid, alg", recorded in the audit trail as it is written."""
    settings = app.settings
    keyring.changeable_ring(settings.key_file, settings.secret_key)  # a setting's error before the database's
    write_ring = partial(keyring.change_ring, settings.key_file, settings.secret_key, edit)
    with app.session() as db:
        changes = service.change_keys_audited(db, write_ring)
    for change in changes:
        note(f"key {change.kid} ({change.alg}): {KEY_ACTIONS[change.action]}")
    return changes


KEY_ACTIONS = {
    "add": "added as next (published, not signing yet)",
    "activate": "active: it signs new tokens",
    "deactivate": "retiring: it verifies, no longer signs",
    "retire": "retired and removed: tokens it signed now fail",
}


@keys.command("list")
@output_option(output.DATA_FORMATS)
@pass_app
def keys_list(app: App, fmt: str) -> None:
    """List the keys: kid, alg, state, created, and a fingerprint of each public key.

    \b
    Example:
      usermgr keys list -o json
    """
    output.write_records((key.record() for key in tokens.key_ring(app.settings).keys), fmt, KEY_FIELDS)


@keys.command("add")
@alg_option
@pass_app
def keys_add(app: App, alg: str | None) -> None:
    """Add a next key: published (JWKS) but not signing. Prints its kid.

    \b
    Example:
      KID=$(usermgr keys add --alg ES256)
    """
    changes = _change_keys(app, keyring.add_key(alg or app.settings.token_algorithm))
    click.echo(changes[0].kid)


@keys.command("activate", context_settings=KID_ARGUMENTS)
@click.argument("kid")
@pass_app
def keys_activate(app: App, kid: str) -> None:
    """KID signs new tokens from now on; the active key becomes retiring.

    \b
    Example:
      usermgr keys activate "$KID"
    """
    if not _change_keys(app, keyring.activate_key(kid)):
        note(f"key {kid} is already the active key: nothing changed")


@keys.command("rotate")
@alg_option
@pass_app
def keys_rotate(app: App, alg: str | None) -> None:
    """Add a key and activate it at once (the active key becomes retiring). Prints its kid.

    Use add, then activate after the verifiers' JWKS cache time, where verifiers fetch the
    JWK Set; rotate suits HS256 and verifiers that read the ring file itself.

    \b
    Example:
      usermgr keys rotate
    """
    changes = _change_keys(app, keyring.rotate_key(alg or app.settings.token_algorithm))
    click.echo(changes[0].kid)


@keys.command("retire", context_settings=KID_ARGUMENTS)
@click.argument("kid")
@pass_app
def keys_retire(app: App, kid: str) -> None:
    """Remove KID: tokens it signed fail with "unknown key". Never the active key (exit 5).

    \b
    Example:
      usermgr keys retire "$OLD_KID"
    """
    _change_keys(app, keyring.retire_key(kid))


@keys.command("export", context_settings=KID_ARGUMENTS)
@click.argument("kids", nargs=-1, metavar="[KID...]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jwks", "pem"]),
    default="jwks",
    show_default=True,
    help="A JWK Set (JSON), or PEM public keys one after another.",
)
@pass_app
def keys_export(app: App, kids: tuple[str, ...], fmt: str) -> None:
    """Print public keys only: every asymmetric key, or the KIDs named. Never a private
    key or an HS256 secret (asking for an HS256 key is exit 3).

    \b
    Example:
      usermgr keys export > jwks.json
      usermgr keys export --format pem "$KID" > issuer.pub
    """
    ring = tokens.key_ring(app.settings)
    chosen = [ring.get(kid) for kid in kids] if kids else [key for key in ring.keys if not key.symmetric]
    if fmt == "pem":
        click.echo("".join(key.public_pem() for key in chosen), nl=False)
    else:
        click.echo(json.dumps({"keys": [key.public_jwk for key in chosen]}, indent=2))
    if not chosen:
        note("no asymmetric key in the ring: HS256 secrets are never exported (`usermgr keys add --alg ES256`)")


@cli.command("import")
@click.argument(
    "source", default="-", metavar="[FILE | -]", type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
@click.option(
    "--format", "fmt", type=click.Choice(output.IMPORT_FORMATS), help="Input format [default: from FILE's extension]."
)
@click.option(
    "--on-conflict",
    type=click.Choice(["error", "skip", "update"]),
    default="error",
    show_default=True,
    help="What to do with an email that already exists.",
)
@click.option("--dry-run", is_flag=True, help="Validate and count, but write nothing.")
@click.option("--no-csv-guard", is_flag=True, help="Take CSV cells literally: keep a ' that `export -o csv` added.")
@pass_app
def import_users(app: App, source: str, fmt: str | None, on_conflict: str, dry_run: bool, no_csv_guard: bool) -> None:
    """Add users in bulk from CSV or JSONL: all of them, or none.

    Fields as `export` writes them (email required; id and locked_until are ignored),
    and either password (hashed here) or hashed_password (argon2 or bcrypt, stored as
    it is). Every row is validated first.
    Text in UTF-8 (with or without a byte-order mark) or in UTF-16 with a byte-order
    mark; lines end in LF, CRLF or CR.

    \b
    Example:
      usermgr import staff.csv --on-conflict skip
      usermgr --db old.db export --with-hashes | usermgr --db new.db import - --format jsonl
    """
    fmt = fmt or (output.format_for_path(source) if source != "-" else None)
    if fmt is None:
        raise click.UsageError("cannot tell the input format: give --format csv or --format jsonl")
    with _open_text(source) as stream:
        plan = service.plan_import(output.read_rows(stream, fmt, csv_guard=not no_csv_guard))
    try:
        with app.session() as db:
            if plan.passwords and not dry_run:
                service.check_import(db, plan, on_conflict=on_conflict)  # a conflict before the first hash
                _hash_with_progress(plan, app.settings)
            result = _write_with_progress(db, plan, on_conflict, dry_run)
    finally:
        plan.close()
    prefix = "dry run, nothing written: would have" if dry_run else "imported:"
    note(f"{prefix} {result.created} created, {result.updated} updated, {result.skipped} skipped")


def _open_text(source: str) -> Any:
    """The text of FILE or standard input, decoded as its byte-order mark says (see
    `output.open_import_text`)."""
    binary = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115 (the text stream closes it)
    return output.open_import_text(binary)


def _hash_with_progress(plan: Any, settings: Settings) -> None:
    """Hash the import's passwords, saying first how long it will take; a progress bar
    on a terminal, none when stderr is piped."""
    count = len(plan.passwords)
    note(
        f"hashing {count} password{'s' if count != 1 else ''}:"
        f" about {_duration(service.seconds_to_hash(plan, settings))}"
    )
    if not sys.stderr.isatty():
        service.hash_passwords(plan, settings)
        return
    with click.progressbar(length=count, label="hashing", file=sys.stderr) as bar:
        service.hash_passwords(plan, settings, bar.update)


LARGE_IMPORT_ROWS = 10_000


def _write_with_progress(db: Session, plan: Any, on_conflict: str, dry_run: bool) -> Any:
    """Write the import in its one transaction. A progress bar on a terminal; piped, a line
    at each tenth of a large import, so that a log shows it is alive (nothing is committed
    before the last)."""

    def write(progress: Callable[[int], None] | None) -> Any:
        return service.apply_import(db, plan, on_conflict=on_conflict, dry_run=dry_run, progress=progress)

    if sys.stderr.isatty():
        with click.progressbar(length=plan.rows, label="writing", file=sys.stderr) as bar:
            return write(bar.update)
    if plan.rows < LARGE_IMPORT_ROWS:
        return write(None)
    written = 0

    def log_each_tenth(rows: int) -> None:
        nonlocal written
        tenth_before = written * 10 // plan.rows
        written += rows
        if written * 10 // plan.rows > tenth_before:
            note(f"writing: {written} of {plan.rows} rows, committed only when all are written")

    return write(log_each_tenth)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@cli.command()
@click.option("--with-hashes", is_flag=True, help="Add hashed_password, so that passwords move too.")
@click.option(
    "--no-csv-guard",
    is_flag=True,
    help="Write CSV cells as they are: no ' before a cell that starts with = + - @ tab CR or '.",
)
@output_option(output.IMPORT_FORMATS, default="jsonl")
@pass_app
def export(app: App, with_hashes: bool, no_csv_guard: bool, fmt: str) -> None:
    """Every user, streamed, in the shape `import` takes back unchanged.

    CSV puts a ' before a cell that a spreadsheet would run as a formula (= + - @ tab CR)
    or that starts with '; `import` takes it off again.

    \b
    Example:
      usermgr export --with-hashes > users.jsonl
      usermgr export -o csv | usermgr --db postgresql://db/app import - --format csv
    """
    fields = (*USER_FIELDS, "hashed_password") if with_hashes else USER_FIELDS
    with app.session() as db:
        rows = service.iter_user_rows(db, with_hashes=with_hashes, stored=True)
        count = output.write_rows(rows, fmt, fields, types=USER_RECORD, csv_guard=not no_csv_guard)
    note(f"exported {count} user{'s' if count != 1 else ''}")


# ---- the audit trail -------------------------------------------------------------------------

TABLE_EVENT_FIELDS = tuple(name for name in EVENT_FIELDS if name not in ("target_uid", "prev_hash", "hash"))
"""`audit`'s table leaves out the uid and the two hashes: too wide to read; -o jsonl has them."""


def _event_rows(events: Iterator[dict[str, Any]], fmt: str) -> Iterator[dict[str, Any]]:
    """Events as the format shows them: in a table or CSV cell, `changes` as compact JSON."""
    if fmt in ("json", "jsonl"):
        yield from events
        return
    import json

    for event in events:
        yield {**event, "changes": json.dumps(event["changes"], ensure_ascii=False, sort_keys=True)}


@cli.group(invoke_without_command=True)
@click.option("--user", metavar="USER", help="Only events about USER (a deleted user: by uid or email).")
@click.option("--actor", metavar="A", help="Only events by A (`os:user@host`, `uid:UUID`) or on behalf of A.")
@click.option("--action", metavar="X", help="Only events of this action, such as user.create or login.failure.")
@click.option("--since", metavar="T", help="Only events at or after T: an ISO date/time, or a duration ago (7d).")
@click.option("--until", metavar="T", help="Only events before T: an ISO date/time, or a duration ago.")
@click.option("--limit", type=click.IntRange(min=0), help="At most N events.")
@output_option(output.DATA_FORMATS)
@click.pass_context
def audit(
    ctx: click.Context,
    user: str | None,
    actor: str | None,
    action: str | None,
    since: str | None,
    until: str | None,
    limit: int | None,
    fmt: str,
) -> None:
    """The audit trail, oldest first, streamed: who changed what, logins, prunes.

    `audit verify` checks the hash chain (exit 9 when broken); `audit prune --before T`
    drops old events and keeps the chain verifiable.

    \b
    Example:
      usermgr audit --user ada@example.com --action role.grant
      usermgr audit --since 1d -o jsonl > audit.jsonl
      usermgr audit verify
    """
    if ctx.invoked_subcommand is not None:
        if any(value is not None for value in (user, actor, action, since, until, limit)):
            raise click.UsageError(f"the filters apply to `usermgr audit` alone, not to `{ctx.invoked_subcommand}`")
        return
    app = cast(App, ctx.obj)
    filters = service.audit_filter(user, actor, action, since, until, limit, time_option="--{}")
    fields = TABLE_EVENT_FIELDS if fmt == "table" else EVENT_FIELDS
    with app.session() as db:
        output.write_records(_event_rows(service.iter_events(db, filters), fmt), fmt, fields)


@audit.command("verify")
@pass_app
def audit_verify(app: App) -> None:
    """Walk the hash chain: "intact" (exit 0), or the first event edited, inserted or deleted (exit 9).

    \b
    Example:
      usermgr audit verify || alert "the audit trail was tampered with"
    """
    with app.session() as db:
        report = service.verify_chain(db)
    note(f"audit trail intact: {report.events} event{'s' if report.events != 1 else ''}, head {report.head}")


@audit.command("prune")
@click.option(
    "--before", required=True, metavar="T", help="Drop events older than T: an ISO date/time or a duration ago."
)
@pass_app
def audit_prune(app: App, before: str) -> None:
    """Drop events older than T, keeping the chain verifiable; the prune is itself an event.

    \b
    Example:
      usermgr audit prune --before 365d
    """
    moment = service.parse_time(before, "--before")
    with app.session() as db:
        removed = service.prune(db, moment)
    note(f"pruned {removed} audit event{'s' if removed != 1 else ''} older than {moment.isoformat()}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Server processes (uvicorn's workers). They share every rule through the database: use PostgreSQL.",
)
@click.option(
    "--proxy-headers/--no-proxy-headers",
    default=True,
    show_default=True,
    help="Take the client's address and scheme from X-Forwarded-For/-Proto sent by --forwarded-allow-ips.",
)
@click.option(
    "--forwarded-allow-ips",
    metavar="IPS",
    help="Comma-separated proxy addresses (or *) trusted for X-Forwarded-*."
    " [default: $FORWARDED_ALLOW_IPS, else 127.0.0.1]",
)
@pass_app
def serve(app: App, host: str, port: int, workers: int, proxy_headers: bool, forwarded_allow_ips: str | None) -> None:
    """Run the HTTP API with uvicorn (needs the `api` extra).

    With --workers N, N processes answer on one port; a lockout, the last admin and a
    revoked token hold across them, as across hosts, because they live in the database.
    On SQLite they work too, but every write waits for the one before it.

    \b
    Example:
      usermgr --db users.db serve --port 8000
      usermgr --db postgresql://app@db/app serve --host 0.0.0.0 --workers 4 --forwarded-allow-ips 10.0.0.2
    """
    try:
        import uvicorn

        from usermgr.api import create_app
    except ImportError:
        raise errors.ConfigurationError("the HTTP API needs the `api` extra: pip install 'usermgr[api]'") from None
    database.check_url(app.settings.database_url)  # an unusable URL stops here, not on every request
    tokens.signing_key(app.settings)  # so does a missing key: a container without its secret exits 2 at once
    base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    note(f"serving on {base_url} (docs: {base_url}/docs)")
    if workers == 1:
        target: Any = create_app(app.settings)
    else:
        # Each worker is a new process that builds its own app from the USERMGR_* variables:
        # hand it the settings this command was given as options.
        os.environ.update(_settings_environment(app.settings))
        target = "usermgr.api:create_app"
    uvicorn.run(
        target,
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
    )


def _settings_environment(settings: Settings) -> dict[str, str]:
    """The USERMGR_* variables that give a new process the settings of the global options."""
    variables = {"USERMGR_DATABASE_URL": settings.database_url, "USERMGR_DEBUG": "1" if settings.debug else ""}
    if settings.key_file is not None:
        variables["USERMGR_KEY_FILE"] = str(settings.key_file)
    return variables


if __name__ == "__main__":
    main()
