"""The HTTP API: a thin FastAPI face over the service. No rule lives here.

Routes parse the request, call one service function and shape the answer; every rule
(unique email, the last admin, lockout, token revocation) is the service's, exactly as
for the CLI. Domain errors become JSON `{"detail": ...}` with the status from
`errors.ERROR_TABLE`.

Importing this module touches neither the database nor the key file: settings are
loaded at startup (or on the first request) and the database is bound on first use.

The app `create_app` makes also guards its HTTP edge (see `_add_http_edge`): request bodies
over `MAX_BODY_BYTES` get 413 without being read, every response carries the security
headers of `SECURITY_HEADERS`, and a 405 names every method its path allows.

An existing FastAPI app can reuse the pieces::

    api.install(app)                      # settings, database binding, error handlers
    app.include_router(api.auth_router)
    app.include_router(api.users_router)
    # and in its own routes: Depends(api.get_db), Depends(api.current_user),
    # Depends(api.require_role("editor"))
"""

import base64
import hashlib
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import to_json
from secure import CacheControl, ReferrerPolicy, Secure, XContentTypeOptions, XFrameOptions
from secure.middleware import SecureASGIMiddleware
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usermgr import __version__, database, errors, output, security, service, tokens
from usermgr.config import Settings, load_settings
from usermgr.contract import ADMIN_ROLE
from usermgr.models import User
from usermgr.schemas import (
    PASSWORD_MAX_LENGTH,
    PASSWORD_MIN_LENGTH,
    ROLE_NAME,
    AuditEventResponse,
    Password,
    UserCreate,
    UserResponse,
    UserUpdate,
    validate_role_name,
)

LIST_LIMIT_DEFAULT = 100
LIST_LIMIT_MAX = 1000
TOKEN_URL = "/auth/login"
_STATE_KEY = "usermgr"

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body accepted (1 MiB): a signup or a PATCH needs a few hundred bytes."""
BODY_TOO_LARGE = f"request body too large: send at most {MAX_BODY_BYTES} bytes"
AMBIGUOUS_LENGTH = "send Content-Length or Transfer-Encoding, not both"

API_THREADS = 16
"""Threads for blocking work (a route or dependency that is a plain `def`: the database, a
password hash) in each server process, and so its database connections: with one pool
connection per thread none waits for one, and `--workers N` opens at most N x 16 on
PostgreSQL (its default max_connections is 100). Above two cores' worth, more threads
only queue on the GIL and on argon2's CPU."""
SERVER_ERROR = "internal server error: the server's log has the details"
DOCS_ASSETS_PATH = "/docs-assets"
"""Where the app serves Swagger UI's and ReDoc's own files (scripts, style sheet, icon)."""

SECURITY_HEADERS = Secure(
    xcto=XContentTypeOptions(),  # nosniff: a JSON answer is never run as a script or page
    referrer=ReferrerPolicy().no_referrer(),
    xfo=XFrameOptions().deny(),
    # Every answer but the Swagger page holds user data or a token; none is worth caching.
    cache=CacheControl().no_store(),
)
"""Sent on every response of `create_app`'s app, errors included."""


logger = logging.getLogger(__name__)


# ---- per-app state: settings and the database binding, made on first use ---------------------


class _Runtime:
    """One app's settings (loaded from USERMGR_* on first use when not given) and its own
    database, opened on first use."""

    def __init__(self, settings: Settings | None) -> None:
        self._settings = settings
        self._database: database.Database | None = None
        self._lock = threading.RLock()

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            with self._lock:
                if self._settings is None:
                    self._settings = load_settings()
        return self._settings

    @property
    def opened_database(self) -> database.Database | None:
        """The app's database if it was opened, without opening it."""
        return self._database

    @property
    def database(self) -> database.Database:
        """The app's database, opened once; a failure (no database yet) is retried on the next request."""
        if self._database is None:
            with self._lock:
                if self._database is None:
                    self._database = database.Database(self.settings.database_url, pool_size=API_THREADS)
        return self._database


def _runtime(request: Request) -> _Runtime:
    runtime: _Runtime | None = getattr(request.app.state, _STATE_KEY, None)
    if runtime is None:
        raise RuntimeError("usermgr's routes need `usermgr.api.install(app)` (create_app() does it)")
    return runtime


# ---- errors ------------------------------------------------------------------------------------


_SERVER_SIDE_DETAIL = {
    status.HTTP_500_INTERNAL_SERVER_ERROR: "the server is misconfigured: its log says how",
    status.HTTP_503_SERVICE_UNAVAILABLE: "the database is unavailable: the server's log says why",
}


def _domain_error_response(_request: Request, error: errors.UsermgrError) -> JSONResponse:
    """The error's own message for the client's mistakes; for the server's own trouble
    (a key file, a database) only a generic one: paths and driver text stay in the log."""
    code = errors.http_status(error)
    headers = {"WWW-Authenticate": "Bearer"} if code == status.HTTP_401_UNAUTHORIZED else None
    detail = _SERVER_SIDE_DETAIL.get(code)
    if detail is not None:
        logger.error("usermgr: %s", error)
    return JSONResponse({"detail": detail or str(error)}, status_code=code, headers=headers)


def _database_error_response(request: Request, error: DBAPIError) -> JSONResponse:
    """A failure of the database itself is a 503; anything else stays a server error."""
    opened = _runtime(request).opened_database
    domain = database.as_domain_error(error, opened.engine.url if opened is not None else None)
    if domain is None:
        raise error
    return _domain_error_response(request, domain)


def _validation_error_response(_request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with where (`loc`), why (`msg`) and the kind (`type`) of each issue, never what was
    sent: pydantic's `input` and `ctx` would hand a submitted password straight back."""
    issues = [
        {
            "loc": list(issue["loc"]),
            "msg": issue["msg"].removeprefix("Value error, "),
            "type": issue["type"],
        }
        for issue in error.errors()
    ]
    return JSONResponse({"detail": issues}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def install(app: FastAPI, settings: Settings | None = None) -> FastAPI:
    """Prepare `app` for usermgr's routers and dependencies: its settings (None = USERMGR_*
    variables, read on first use) and the error handlers, the 422 one included (it keeps
    submitted values, a password first, out of every 422 of `app`). Returns `app`."""
    setattr(app.state, _STATE_KEY, _Runtime(settings))
    # The ignores: Starlette types every handler as taking any Exception, though it only ever
    # hands one the class it was registered for (Kludex/starlette#2403, open).
    app.add_exception_handler(errors.UsermgrError, _domain_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(DBAPIError, _database_error_response)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error_response)  # type: ignore[arg-type]
    return app


def warm_up(app: FastAPI) -> None:
    """Load the settings and run one dummy password check now (hash context built, argon2
    loaded), so that the first login for an unknown email costs what the next ones cost;
    a bad setting fails at startup instead of on the first request."""
    runtime: _Runtime = getattr(app.state, _STATE_KEY)
    security.verify_dummy("warm-up", runtime.settings.hash_profile)


# ---- reusable dependencies ---------------------------------------------------------------------


class _OneBearer(OAuth2PasswordBearer):
    """FastAPI's bearer scheme, but a request with several Authorization headers is refused:
    the field is a singleton (RFC 9110), and FastAPI would take the first where a proxy in
    front may check or log another, so that the two disagree on who is calling."""

    async def __call__(self, request: HTTPConnection) -> str | None:
        if len(request.headers.getlist("authorization")) > 1:
            raise errors.TokenInvalid("token invalid: send one Authorization header, not several")
        return await super().__call__(request)


oauth2_scheme = _OneBearer(tokenUrl=TOKEN_URL, scheme_name="OAuth2PasswordBearer", auto_error=False)


# What each request pays for (GET /users/me is the hot path): FastAPI runs a plain `def`
# dependency in its threadpool, a hop that costs more than a quick dependency's own work, and
# a generator dependency takes two; every dependency also costs its solving. So the quick
# ones are `async def` and take the `Request` itself, and the token's holder is checked in
# one `def` dependency with a session of its own (`_holder`): one hop in all.


async def get_settings(request: Request) -> Settings:
    return _runtime(request).settings


def _session(request: Request, holder: User | None) -> Iterator[Session]:
    """One session per request, closed after it; the service opens the transactions. Its
    audit events name the caller's address, and the token's holder when one was checked."""
    db = _runtime(request).database.SessionLocal()
    address = service.recorded_address(request.client.host if request.client else None)
    service.act_as(db, service.Actor(service.ANONYMOUS, address=address))
    if holder is not None:
        service.acting_user(db, holder.uid)
    try:
        yield db
    finally:
        db.close()


def get_db(request: Request) -> Iterator[Session]:
    """A session for a request that needs no token (signup, login, healthz): acts as anonymous."""
    yield from _session(request, None)


def _bearer(token: str | None) -> str:
    if not token:
        raise errors.TokenInvalid(f"not authenticated: send `Authorization: Bearer <token>` (get one at {TOKEN_URL})")
    return token


async def bearer_token(token: Annotated[str | None, Depends(oauth2_scheme)]) -> str:
    """The request's bearer token, unchecked; 401 when there is none."""
    return _bearer(token)


def token_claims(
    token: Annotated[str, Depends(bearer_token)], settings: Annotated[Settings, Depends(get_settings)]
) -> dict[str, Any]:
    """The claims of the request's bearer token: signature, expiry, issuer and audience checked."""
    return tokens.decode_token(token, settings, tokens.verification_keys(settings))


def _holder(runtime: _Runtime, token: str, role: str | None = None) -> User:
    """The holder check in a session of its own, closed before the route runs: one trip to
    the threadpool for the whole check, where `get_db` (a generator dependency) takes two."""
    settings = runtime.settings
    with runtime.database.SessionLocal() as db:
        return service.holder_of_token(db, settings, token, tokens.verification_keys(settings), required_role=role)[1]


def current_user(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> User:
    """The token's holder, if it still exists, is enabled, is not locked or expired and has not revoked the token."""
    return _holder(_runtime(request), _bearer(token))


def require_role(name: str) -> Callable[..., User]:
    """A dependency: the token's holder, who must hold role `name` now (in the database, not
    just in the token's claims); 403 without it."""
    role = validate_role_name(name)

    def holder_with_role(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> User:
        return _holder(_runtime(request), _bearer(token), role)

    holder_with_role.__name__ = f"require_role_{role}"
    return holder_with_role


require_admin = require_role(ADMIN_ROLE)


def admin_db(request: Request, admin: Annotated[User, Depends(require_admin)]) -> Iterator[Session]:
    """A session for an admin's request: the token's holder holds the admin role now, and
    the audit events the request writes name them."""
    yield from _session(request, admin)


DB = Annotated[Session, Depends(get_db)]
AdminDB = Annotated[Session, Depends(admin_db)]
PageLimit = Annotated[int, Query(ge=0, le=LIST_LIMIT_MAX, description=f"At most this many (at most {LIST_LIMIT_MAX}).")]
PageOffset = Annotated[int, Query(ge=0, le=service.MAX_ROW_COUNT, description="Skip this many first.")]
USER_ID_DIGITS = "a user id is written in plain digits: no sign, point, space, underscore or leading zero"
_PLAIN_DIGITS = re.compile(r"-?(0|[1-9][0-9]*)")  # a sign, to leave -1 to `ge`'s message


def _plain_digits(value: Any) -> Any:
    """A path's id as text, refused unless in the one form an id is written in: pydantic's lax
    int also takes `01`, `+1`, `1.0`, ` 1` and `1_0`, one user under many paths, so that a
    proxy's rule or a cache keyed on `/users/2` is passed by `/users/02`."""
    if isinstance(value, str) and not _PLAIN_DIGITS.fullmatch(value):
        raise ValueError(USER_ID_DIGITS)
    return value


UserId = Annotated[
    int, Path(ge=1, le=service.MAX_USER_ID, description="The user's numeric id."), BeforeValidator(_plain_digits)
]
RoleName = Annotated[
    str, Path(pattern=f"^{ROLE_NAME.pattern}$", description="A role name: 1 to 64 of a-z, 0-9, _ and -.")
]


# ---- request and response shapes ----------------------------------------------------------------


class SignupRequest(UserCreate):
    """A new account: as `UserCreate`, but the password is required. There is no `roles` field."""

    password: Annotated[
        Password,
        Field(
            description=f"{PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters, counted after NFKC normalisation.",
            repr=False,
        ),
    ]


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ErrorResponse(BaseModel):
    detail: str


class ValidationIssue(BaseModel):
    """Where, why and what kind: never the submitted value."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int]
    msg: str
    type: str


class InvalidResponse(BaseModel):
    """422: the issues pydantic found in a malformed request, or one message from the service."""

    detail: str | list[ValidationIssue]


_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}


def _answer(model: type[BaseModel], description: str, status_code: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"model": model, "description": description}
    if status_code == status.HTTP_401_UNAUTHORIZED:
        answer["headers"] = _UNAUTHORIZED_HEADERS
    return answer


def _responses(*raised: type[errors.UsermgrError], parses_body: bool = False) -> dict[int | str, dict[str, Any]]:
    """What a route answers besides success: the statuses of the domain errors it can raise,
    from errors.ERROR_TABLE (so they cannot drift from what the handlers send), each described
    by its error's docstring; 400 when it parses a body; and 413 and 503, which any request
    can get."""
    answers: dict[int | str, dict[str, Any]] = {}
    if parses_body:
        answers[400] = _answer(ErrorResponse, "The body cannot be parsed", 400)
    for error in (*raised, errors.DatabaseUnavailable):
        code = errors.http_status(error())
        model = InvalidResponse if code == status.HTTP_422_UNPROCESSABLE_CONTENT else ErrorResponse
        answers[code] = _answer(model, (error.__doc__ or error.__name__).strip().splitlines()[0], code)
    answers[413] = _answer(ErrorResponse, f"The request body is over {MAX_BODY_BYTES} bytes", 413)
    return dict(sorted(answers.items(), key=lambda item: int(item[0])))


REPEATED_FIELD = "the JSON body names a field more than once"
REPEATED_PARAMETER = "given more than once: give it once"
REPEATED_FORM_FIELD = "the form names a field more than once"


class _UnambiguousRequest(Request):
    """A request whose JSON body, or form, names each key once."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = json.loads(await self.body(), object_pairs_hook=output.object_named_once)
            except output.NamedTwice:  # 400, as any body that cannot be parsed
                raise HTTPException(status.HTTP_400_BAD_REQUEST, REPEATED_FIELD) from None
        return self._json

    async def _get_form(
        self, *, max_files: int | float = 1000, max_fields: int | float = 1000, max_part_size: int = 1024 * 1024
    ) -> FormData:
        """Starlette's form (what FastAPI's `Form` fields read), refused if it names a field twice."""
        form = await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
        if len(form) != len(form.multi_items()):
            await form.close()
            raise HTTPException(status.HTTP_400_BAD_REQUEST, REPEATED_FORM_FIELD)
        return form


def _query_names(dependant: Dependant) -> set[str]:
    """The names of the query parameters a route takes, its dependencies' included."""
    return {field.alias for field in dependant.query_params}.union(*map(_query_names, dependant.dependencies))


class _UnambiguousRoute(APIRoute):
    """A route that takes each of its query parameters and each JSON key once.

    Starlette and Python's JSON decoder keep the last of two equal names, where a proxy, a
    cache or a validator in front of the API may read the first: the two would then disagree
    on what was asked (which role was listed, which email signed up). A repeat is refused
    instead: 422 for a query parameter of the route's own, 400 for a key of the body.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        own = _query_names(self.dependant)
        has_body = self.body_field is not None  # the others (GET /users/me, the hot path) skip the copy

        async def unambiguous(request: Request) -> Response:
            names = Counter(name for name, _ in request.query_params.multi_items() if name in own) if own else {}
            repeated = sorted(name for name, count in names.items() if count > 1)
            if repeated:
                raise RequestValidationError(
                    [
                        {"loc": ("query", name), "msg": REPEATED_PARAMETER, "type": "repeated_parameter"}
                        for name in repeated
                    ]
                )
            return await handler(_UnambiguousRequest(request.scope, request.receive) if has_body else request)

        return unambiguous


_AUTHENTICATED = (errors.TokenInvalid,)
_ADMIN = (errors.TokenInvalid, errors.Forbidden)


# ---- /auth -------------------------------------------------------------------------------------

auth_router = APIRouter(prefix="/auth", tags=["auth"], max_body_size=MAX_BODY_BYTES, route_class=_UnambiguousRoute)


@auth_router.post(
    "/signup",
    status_code=status.HTTP_201_CREATED,
    response_model=UserResponse,
    responses=_responses(errors.Conflict, errors.InvalidInput, parses_body=True),
    summary="Create an account (never with a role)",
)
def signup(body: SignupRequest, db: DB, settings: Annotated[Settings, Depends(get_settings)]) -> User:
    return service.create_user(db, settings, body)


@auth_router.post(
    "/login",
    response_model=TokenResponse,
    responses=_responses(errors.AuthenticationFailed, errors.InvalidInput, parses_body=True),
    summary="Exchange email and password for an access token",
)
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], db: DB, settings: Annotated[Settings, Depends(get_settings)]
) -> TokenResponse:
    """`username` is the email, never a numeric id (an all-digit one is an unknown user).
    Unknown email, wrong password, disabled or locked: one 401. Attempts count toward the
    same lockout as `usermgr login`."""
    return TokenResponse(access_token=service.login(db, settings, form.username, form.password, email_only=True))


# ---- /users ------------------------------------------------------------------------------------

users_router = APIRouter(prefix="/users", tags=["users"], max_body_size=MAX_BODY_BYTES, route_class=_UnambiguousRoute)


@users_router.get(
    "/me", response_model=UserResponse, responses=_responses(*_AUTHENTICATED), summary="The token's holder"
)
def read_me(request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]) -> Response:
    """The hot path, so cut to what it needs: one trip to the threadpool for the token check
    and one Core SELECT of the holder with their roles on a pooled connection (no session, no
    `User`), the record encoded by pydantic-core itself (UserResponse's own JSON, unvalidated
    a second time). The rules are `current_user`'s, in `service.holder_record`."""
    runtime = _runtime(request)
    settings = runtime.settings
    record = service.holder_record(runtime.database, settings, _bearer(token), tokens.verification_keys(settings))
    return Response(to_json(record), media_type="application/json")


@users_router.get(
    "",
    response_model=list[UserResponse],
    responses=_responses(*_ADMIN, errors.InvalidInput),
    summary="List users (admin)",
)
def list_users(
    db: AdminDB,
    role: Annotated[str | None, Query(description="Only users with this role.")] = None,
    active: Annotated[bool | None, Query(description="Only enabled (true) or disabled (false) users.")] = None,
    search: Annotated[str | None, Query(description="Text in the email, username or full name.")] = None,
    limit: PageLimit = LIST_LIMIT_DEFAULT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    """Users oldest first, one page at a time: `limit` defaults to 100 and is at most 1000."""
    filters = service.UserFilter(role=role, active=active, search=search, limit=limit, offset=offset)
    return list(service.iter_user_records(db, filters))


@users_router.get(
    "/{user_id}",
    response_model=UserResponse,
    responses=_responses(*_ADMIN, errors.NotFound, errors.InvalidInput),
    summary="One user (admin)",
)
def read_user(user_id: UserId, db: AdminDB) -> User:
    return service.get_user(db, str(user_id))


@users_router.patch(
    "/{user_id}",
    response_model=UserResponse,
    responses=_responses(*_ADMIN, errors.NotFound, errors.Conflict, errors.InvalidInput, parses_body=True),
    summary="Change profile fields (admin)",
)
def update_user(user_id: UserId, body: UserUpdate, db: AdminDB) -> User:
    """Only the fields given (and not null) change, as with `usermgr update`; `expires_at`
    null clears the expiry (signup never takes one: nobody sets their own)."""
    changes = service.user_changes(**body.model_dump(exclude_unset=True))
    return service.update_user(db, str(user_id), changes)


@users_router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_responses(*_ADMIN, errors.NotFound, errors.Conflict, errors.InvalidInput),
    summary="Delete a user (admin; never the last active admin)",
)
def delete_user(user_id: UserId, db: AdminDB) -> Response:
    service.delete_users(db, [str(user_id)])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@users_router.put(
    "/{user_id}/roles/{role}",
    response_model=UserResponse,
    responses=_responses(*_ADMIN, errors.NotFound, errors.InvalidInput),
    summary="Grant a role (admin)",
)
def grant_role(user_id: UserId, role: RoleName, db: AdminDB) -> User:
    return service.grant_role(db, [str(user_id)], role)[0]


@users_router.delete(
    "/{user_id}/roles/{role}",
    response_model=UserResponse,
    responses=_responses(*_ADMIN, errors.NotFound, errors.Conflict, errors.InvalidInput),
    summary="Revoke a role (admin; never from the last active admin)",
)
def revoke_role(user_id: UserId, role: RoleName, db: AdminDB) -> User:
    return service.revoke_role(db, [str(user_id)], role)[0]


# ---- /audit ------------------------------------------------------------------------------------

audit_router = APIRouter(prefix="/audit", tags=["audit"], max_body_size=MAX_BODY_BYTES, route_class=_UnambiguousRoute)


@audit_router.get(
    "",
    response_model=list[AuditEventResponse],
    responses=_responses(*_ADMIN, errors.NotFound, errors.InvalidInput),
    summary="The audit trail (admin)",
)
def read_audit(
    db: AdminDB,
    user: Annotated[str | None, Query(description="Only events about this user (id, email, username or uid).")] = None,
    actor: Annotated[str | None, Query(description="Only events by this actor, or on behalf of it.")] = None,
    action: Annotated[str | None, Query(description="Only events of this action, such as `user.create`.")] = None,
    since: Annotated[
        str | None, Query(description="Only events at or after this time: ISO 8601, or a duration ago (`7d`).")
    ] = None,
    until: Annotated[
        str | None, Query(description="Only events before this time: ISO 8601, or a duration ago.")
    ] = None,
    limit: PageLimit = LIST_LIMIT_DEFAULT,
    offset: PageOffset = 0,
) -> list[dict[str, Any]]:
    """Events oldest first, one page at a time: `limit` defaults to 100 and is at most 1000.
    Times as `usermgr audit` takes them: a time without a zone is UTC."""
    filters = service.audit_filter(user, actor, action, since, until, limit, offset)
    return list(service.iter_events(db, filters))


# ---- health and the app ------------------------------------------------------------------------


def healthz(db: DB) -> HealthResponse:
    """200 when the database answers `SELECT 1`, else 503."""
    service.ping(db)
    return HealthResponse(status="ok")


# ---- the public keys: /.well-known/jwks.json ---------------------------------------------------

JWKS_PATH = "/.well-known/jwks.json"
JWKS_MAX_AGE = 300
"""Seconds a verifier may cache the JWK Set (5 minutes). The rotation procedure (README, Keys)
waits at least this long between `keys add` and `keys activate`, so that every verifier has
fetched the new public key before the first token it signs."""
JWKS_CACHE_CONTROL = f"public, max-age={JWKS_MAX_AGE}"


class JsonWebKeySet(BaseModel):
    """A JWK Set (RFC 7517): public keys only, each with its `kid`, `alg` and `use: sig`."""

    keys: list[dict[str, Any]]


def jwks(settings: Annotated[Settings, Depends(get_settings)]) -> dict[str, Any]:
    """The public keys of the key ring's asymmetric keys (next, active and retiring), for any
    JOSE library to verify tokens with, by `kid`. Empty while every key is HS256. The key
    file is parsed again only when it changed, so a `usermgr keys` change shows at once."""
    return tokens.public_jwks(settings)


class _PublicCacheControl:
    """`Cache-Control: public, max-age=...` on the JWK Set's 200s: every other answer keeps
    the security headers' `no-store` (this sits outside them, so it has the last word)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != JWKS_PATH:
            await self.app(scope, receive, send)
            return

        async def send_with_cache_control(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == status.HTTP_200_OK:
                headers = [(name, value) for name, value in message["headers"] if name.lower() != b"cache-control"]
                message["headers"] = [*headers, (b"cache-control", JWKS_CACHE_CONTROL.encode())]
            await send(message)

        await self.app(scope, receive, send_with_cache_control)


def _add_jwks(app: FastAPI) -> None:
    app.add_api_route(
        JWKS_PATH,
        jwks,
        methods=["GET"],
        response_model=JsonWebKeySet,
        responses=_responses(),
        tags=["keys"],
        summary="The public signing keys (JWK Set), cacheable",
    )
    app.add_middleware(_PublicCacheControl)


# ---- the HTTP edge: body limit, security headers, 405 and 500 ---------------------------------


def _too_large_response(_request: Request | None = None, _error: Exception | None = None) -> JSONResponse:
    """The one 413, whether Content-Length gave the body away or its bytes were counted."""
    return JSONResponse({"detail": BODY_TOO_LARGE}, status_code=status.HTTP_413_CONTENT_TOO_LARGE)


class _DeclaredBodyLimit:
    """413 at once, before any route runs, when Content-Length declares more than the limit;
    400 when a request declares both a Content-Length and a Transfer-Encoding.

    A body without a declared length (chunked) is counted as it streams by FastAPI's own
    `max_body_size` on the routers, which refuses it as soon as the count passes the limit.
    That one checks Content-Length too, but only when the route reads its body or answers: a
    DELETE, which reads none, would have deleted before its 204 was turned into a 413.

    A body framed both ways is read by Transfer-Encoding (RFC 9112 allows it) where a proxy in
    front may have read it by Content-Length, and the rest then passes as a request the proxy
    never saw (request smuggling); the RFC says such a message "ought to be handled as an
    error". The 400 closes the connection, so nothing after it is read as a request.
    """

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length, chunked = self._framing(scope)
            if length is not None and chunked:
                await _ambiguous_length_response()(scope, receive, send)
                return
            if length is not None and length > self.max_body_size:
                await _too_large_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _framing(scope: Scope) -> tuple[int | None, bool]:
        """The Content-Length (0 for a malformed one: the server itself refuses those), None
        without one; and whether a Transfer-Encoding is given. Read off the raw header list:
        ASGI servers give the names lowercased, and a `Headers` lookup that misses (every GET)
        costs a raised KeyError."""
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
            elif name == b"transfer-encoding":
                chunked = True
        return length, chunked


def _ambiguous_length_response() -> JSONResponse:
    return JSONResponse(
        {"detail": AMBIGUOUS_LENGTH}, status_code=status.HTTP_400_BAD_REQUEST, headers={"Connection": "close"}
    )


def _documented_methods(app: FastAPI, path: str) -> set[str]:
    """The methods the OpenAPI document gives the path templates that `path` fits."""
    methods: set[str] = set()
    for template, operations in app.openapi()["paths"].items():
        pattern = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^/}]+\}", template))
        if re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return methods


def _method_not_allowed_response(request: Request, error: HTTPException) -> JSONResponse:
    """405 whose `Allow` names every method of the path. Starlette names only those of the
    first route that fits it, and /users/{user_id} is three routes (GET, PATCH, DELETE)."""
    starlettes = (error.headers or {}).get("Allow", "")
    allowed = {method.strip() for method in starlettes.split(",") if method.strip()}
    allowed |= _documented_methods(request.app, request.url.path)
    headers = {"Allow": ", ".join(sorted(allowed))}
    return JSONResponse({"detail": error.detail}, status_code=status.HTTP_405_METHOD_NOT_ALLOWED, headers=headers)


def _server_error_response(_request: Request, _error: Exception) -> JSONResponse:
    """A bug's 500, sent from outside every middleware: so it carries the headers itself."""
    return JSONResponse(
        {"detail": SERVER_ERROR}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR, headers=SECURITY_HEADERS.headers
    )


def _add_http_edge(app: FastAPI) -> None:
    """The body limit's early refusal, the security headers (outermost, so that every answer
    from inside gets them, a 413 included), and the 405, 413 and 500 answers."""
    app.add_middleware(_DeclaredBodyLimit, max_body_size=MAX_BODY_BYTES)
    app.add_middleware(SecureASGIMiddleware, secure=SECURITY_HEADERS)
    # Starlette hands a status code's handler an HTTPException, but types it as any Exception.
    app.add_exception_handler(status.HTTP_405_METHOD_NOT_ALLOWED, _method_not_allowed_response)  # type: ignore[arg-type]
    app.add_exception_handler(status.HTTP_413_CONTENT_TOO_LARGE, _too_large_response)
    app.add_exception_handler(Exception, _server_error_response)


class _QueryLeftOut(logging.Filter):
    """uvicorn's request lines with the query string left out (`GET /users/me?… HTTP/1.1`).

    The API takes no secret in a URL, but a client may still put one there (`?access_token=`,
    a login form sent as a query), and the log must not keep it for whoever reads it. uvicorn
    passes the path and query as one argument of its access line, and of the error logger's
    line for a WebSocket handshake; it is the only argument that starts with `/`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(map(_without_query, record.args))
        return True


def _without_query(argument: object) -> object:
    if isinstance(argument, str) and argument.startswith("/") and "?" in argument:
        return argument.partition("?")[0] + "?…"
    return argument


_QUERY_LEFT_OUT = _QueryLeftOut()
_REQUEST_LOGGERS = ("uvicorn.access", "uvicorn.error")  # the error logger has the WebSocket lines


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    to_thread.current_default_thread_limiter().total_tokens = API_THREADS  # as many as the pool's connections
    for name in _REQUEST_LOGGERS:
        logging.getLogger(name).addFilter(_QUERY_LEFT_OUT)  # once: the same filter is added once
    await run_in_threadpool(warm_up, app)
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """The usermgr API as its own app; `settings=None` reads USERMGR_* variables at startup."""
    service.load_all()
    app = FastAPI(
        docs_url=None,  # _add_docs serves /docs and /redoc itself, without a CDN
        redoc_url=None,
        title="usermgr",
        version=__version__,
        description="Users, roles and access tokens: the same rules as the `usermgr` CLI.",
        lifespan=_lifespan,
        # No route ends in "/": Starlette's 307 to the slashless path is built from the Host
        # header, a redirect to whatever host the client (or a poisoned cache) names.
        redirect_slashes=False,
    )
    install(app, settings)
    _add_http_edge(app)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(audit_router)
    app.add_api_route(
        "/healthz", healthz, methods=["GET"], response_model=HealthResponse, responses=_responses(), tags=["health"]
    )
    _add_jwks(app)
    _add_docs(app)
    return app


# ---- /docs and /redoc, offline ---------------------------------------------------------------

_DOCS_POLICY = (
    "default-src 'none'",
    "script-src 'self'{inline}",  # and the page's own start-up script, by its hash
    "style-src 'self' 'unsafe-inline'",  # both UIs set style attributes; ReDoc injects <style>
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",  # /openapi.json, and Swagger's "Try it out"
    "worker-src blob:",  # ReDoc's search index
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
)
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def _docs_page(page: HTMLResponse) -> HTMLResponse:
    """`page` with a Content-Security-Policy that lets it load from this host only.

    The API's other answers need none (JSON is never rendered); these pages get one that
    allows only their own inline script (by its hash) and this host's files, so that even
    a link a vendored script holds to another host is never fetched: ReDoc's logo
    (cdn.redoc.ly) is refused by the browser and ReDoc then leaves it out.
    """
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(bytes(page.body).decode())
    )
    page.headers["Content-Security-Policy"] = "; ".join(_DOCS_POLICY).format(inline=hashes)
    return page


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, their scripts, style sheet and icon served from
    DOCS_ASSETS_PATH: fastapi-offline's copies (pinned in setup.cfg), never a CDN, so both
    work on a host without internet. Paths honour the ASGI root_path (a proxy's prefix)."""
    assets = files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _docs_page(
            get_swagger_ui_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=f"{root}{redirect_url}",
                swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
                swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
            )
        )

    def swagger_ui_redirect() -> HTMLResponse:
        return _docs_page(get_swagger_ui_oauth2_redirect_html())

    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _docs_page(
            get_redoc_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{DOCS_ASSETS_PATH}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon.png",
                with_google_fonts=False,
            )
        )

    app.add_api_route("/docs", swagger_ui, methods=["GET"], include_in_schema=False)
    app.add_api_route(redirect_url, swagger_ui_redirect, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)


def __getattr__(name: str) -> FastAPI:
    """`usermgr.api:app` for any ASGI server, built from the USERMGR_* variables when it is
    first asked for: importing this module builds no app."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = create_app()
    globals()["app"] = built
    return built
