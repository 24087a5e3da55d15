"""The baseline of the API figures: `GET /users/me` as a bare FastAPI app does it by hand.

The same work as usermgr's route, written the plain way and nothing else: read the bearer
token, `jwt.decode` it with the key parsed once at start-up (the same checks: signature,
expiry, issuer, required claims), one SELECT of the user and their roles by the token's
`sub` (the unique `uid` index), the same holder checks (exists, enabled, not locked, not
expired, token version), and the same JSON fields (the contract's record, `expires_at`
included). No middleware, no dependencies, no ORM: SQLAlchemy Core on a plain engine, and a
`def` route, which FastAPI runs in its threadpool as its docs advise
for blocking database calls.

It reads the database and key file of a `usermgr init`-made database from the same
variables as usermgr (USERMGR_DATABASE_URL, USERMGR_KEY_FILE; HS256 only), and runs under
uvicorn exactly as `usermgr serve` does (`uvicorn.run(app, host=, port=, workers=)`), so
that both sides have the same server settings:

    python bench/bare_api.py --port 8001 [--workers N]
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import Boolean, DateTime, Integer, String, create_engine, text

DATABASE_URL = os.environ.get("USERMGR_DATABASE_URL", "sqlite:///users.db").replace(
    "postgresql://", "postgresql+psycopg://", 1
)
KEY = Path(os.environ.get("USERMGR_KEY_FILE", "usermgr.key")).read_bytes().strip()
ENGINE = create_engine(DATABASE_URL)
REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub"]

USER_WITH_ROLES = text(
    "SELECT u.id, u.uid, u.email, u.username, u.full_name, u.is_active, u.created_at, u.last_login_at,"
    " u.locked_until, u.expires_at, u.token_version, r.name AS role"
    " FROM users u LEFT JOIN user_roles ur ON ur.user_id = u.id LEFT JOIN roles r ON r.id = ur.role_id"
    " WHERE u.uid = :uid ORDER BY r.name"
).columns(
    id=Integer(),
    uid=String(),
    email=String(),
    username=String(),
    full_name=String(),
    is_active=Boolean(),
    created_at=DateTime(),
    last_login_at=DateTime(),
    locked_until=DateTime(),
    expires_at=DateTime(),
    token_version=Integer(),
    role=String(),
)

app = FastAPI()


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@app.get("/users/me")
def users_me(request: Request) -> dict[str, Any]:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "not authenticated")
    try:
        claims = jwt.decode(
            token,
            KEY,
            algorithms=["HS256"],
            issuer="usermgr",
            leeway=10,
            options={"require": ["exp", "iat", "iss", "sub"]},
        )
    except jwt.PyJWTError:
        raise HTTPException(401, "token invalid") from None
    with ENGINE.connect() as connection:
        rows = connection.execute(USER_WITH_ROLES, {"uid": claims["sub"]}).all()
    if not rows:
        raise HTTPException(401, "token invalid: the user no longer exists")
    user = rows[0]
    locked_until, expires_at, now = _utc(user.locked_until), _utc(user.expires_at), datetime.now(UTC)
    if not user.is_active or (locked_until is not None and locked_until > now):
        raise HTTPException(401, "token invalid: the user is disabled or locked")
    if expires_at is not None and expires_at <= now:
        raise HTTPException(401, "token invalid: the user's account expired")
    if claims.get("ver", 0) != user.token_version:
        raise HTTPException(401, "token invalid: revoked")
    return {
        "id": user.id,
        "uid": user.uid,
        "email": user.email,
        "username": user.username,
        "full_name": user.full_name,
        "is_active": user.is_active,
        "roles": [row.role for row in rows if row.role is not None],
        "created_at": _utc(user.created_at),
        "last_login_at": _utc(user.last_login_at),
        "locked_until": locked_until,
        "expires_at": expires_at,
    }


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers == 1:
        uvicorn.run(app, host=args.host, port=args.port)
    else:  # several workers need the app as an import string, as `usermgr serve --workers` gives it
        uvicorn.run(
            "bare_api:app", host=args.host, port=args.port, workers=args.workers, app_dir=str(Path(__file__).parent)
        )
