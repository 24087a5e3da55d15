"""JWT issue and verify with PyJWT, with the keys of the key ring (usermgr/keyring.py).

Imports neither SQLAlchemy nor pydantic: `usermgr verify TOKEN` must start without them.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import jwt

from usermgr import keyring
from usermgr.config import Settings
from usermgr.errors import ConfigurationError, Forbidden, TokenInvalid

REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub"]
MAX_TOKEN_BYTES = 16 * 1024
VERSION_CLAIM = "ver"
TIME_CLAIMS = ("exp", "iat", "nbf")


# ---- keys -------------------------------------------------------------------------


def _new_ed25519_pem() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def public_key_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".pub")


def create_key_file(path: Path, algorithm: str) -> bool:
    """Create the key file with mode 0600 unless it exists; True if it was created.

    HS256: 32 random bytes, base64url, one line. EdDSA: an Ed25519 private key (PEM),
    and its public key beside it as `<key file>.pub` for services that only verify. Both
    are the single-key form every earlier usermgr reads, and a one-key ring to this one.
    ES256 and RS256 have no such form: a key ring (a JWK Set) of one active key.
    Either the whole key appears or nothing does: a full disk leaves no empty or partial
    key file for a later run to trust, and an existing key is never replaced.
    """
    if path.exists():
        return False
    if path.is_symlink():  # the name is taken by a link to nothing: never followed, never replaced
        raise ConfigurationError(
            f"key file {path} is a symbolic link to a missing file: usermgr makes no key through a link;"
            " make the key where it points (--key-file with that path) or remove the link"
        )
    public_pem = None
    if algorithm == "EdDSA":
        private_pem, public_pem = _new_ed25519_pem()
    elif algorithm == "HS256":
        private_pem = (_new_secret() + "\n").encode()
    else:
        jwk = keyring.new_jwk(algorithm)
        key = keyring.RingKey(kid=jwk["kid"], alg=algorithm, state="active", created=keyring.utc_now(), jwk=jwk)
        private_pem = keyring.Ring(keys=(key,), source=str(path)).serialized()
    try:
        if not keyring.put_in_place(path, private_pem, 0o600, replace=False):
            return False  # another `init` created it first: theirs stands
        if public_pem is not None:
            try:
                keyring.put_in_place(public_key_path(path), public_pem, 0o644, replace=True)
            except OSError:
                path.unlink()  # without its public half the pair is unfinished: the next `init` makes both
                raise
    except OSError as error:
        raise ConfigurationError(
            f"cannot create key file {path}: {error.strerror or error}; no key file was left behind"
        ) from None
    keyring.sync_directory(path.parent)
    return True


def _new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def key_ring(settings: Settings) -> keyring.Ring:
    """The settings' key ring (USERMGR_SECRET_KEY, else the key file), parsed once per process."""
    return keyring.load_ring(settings.key_file, settings.secret_key)


def signing_key(settings: Settings) -> keyring.RingKey:
    """The key that mints tokens: the ring's active key, its private half loaded (so that an
    unusable key fails before anything is recorded)."""
    key = key_ring(settings).active
    key.signer  # noqa: B018 (loads and checks the private key now)
    return key


def verification_keys(
    settings: Settings, public_key_file: Path | None = None, jwks_file: Path | None = None
) -> keyring.KeySet:
    """The keys tokens are checked against, by kid: a public JWK Set or a public key file
    (neither needs a secret: a service can verify but never issue), else the key ring."""
    if jwks_file is not None:
        return keyring.jwks_key_set(jwks_file)
    if public_key_file is not None:
        return keyring.pem_key_set(public_key_file)
    return key_ring(settings).key_set


def public_jwks(settings: Settings) -> dict[str, Any]:
    """The JWK Set of the ring's asymmetric keys, public halves only."""
    return keyring.public_jwks(key_ring(settings))


# ---- tokens -----------------------------------------------------------------------


def issue_token(
    settings: Settings,
    *,
    subject: str,
    email: str,
    roles: list[str],
    token_version: int,
    ttl: int,
    key: keyring.RingKey | None = None,
) -> str:
    """A signed access token for the user whose `uid` is `subject`. `key` defaults to
    `signing_key(settings)`; a caller that must not record anything with an unusable key
    loads it first and passes it in."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.token_issuer,
        "sub": subject,
        "email": email,
        "roles": roles,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        VERSION_CLAIM: token_version,
    }
    if settings.token_audience:
        claims["aud"] = settings.token_audience
    key = signing_key(settings) if key is None else key
    return jwt.encode(claims, key.signer, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})


def _reason(error: jwt.PyJWTError) -> str:
    if isinstance(error, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "not yet valid"
    if isinstance(error, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(error, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"missing claim {error.claim!r}"
    if isinstance(error, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    return "malformed"


def decode_token(
    token: str, settings: Settings, keys: keyring.KeySet, *, required_role: str | None = None
) -> dict[str, Any]:
    """The claims of a valid token; TokenInvalid with the reason, or Forbidden without the role.

    The key is the one the token's `kid` names, with that key's algorithm only."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token invalid: malformed")
    key = keys.for_token(token)
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            leeway=settings.token_leeway,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as error:
        raise TokenInvalid(f"token invalid: {_reason(error)}") from None
    except (ValueError, TypeError):
        raise TokenInvalid("token invalid: malformed") from None
    if not _well_typed(claims):
        raise TokenInvalid("token invalid: malformed")
    if required_role is not None and required_role not in claims["roles"]:
        raise Forbidden(f"forbidden: the token's holder does not have the role {required_role!r}")
    return claims


def _well_typed(claims: dict[str, Any]) -> bool:
    """The claims usermgr reads have the JSON types it issues them with. PyJWT reads a time
    with int(), so it takes "1700000000" and true as times; and true == 1 would pass a
    version check against the database."""
    roles = claims.get("roles")
    return (
        isinstance(roles, list)
        and all(isinstance(role, str) for role in roles)
        and _is_number(claims.get(VERSION_CLAIM, 0), int)
        and isinstance(claims.get("email", ""), str)
        and all(_is_number(claims[name], (int, float)) for name in TIME_CLAIMS if name in claims)
    )


def _is_number(value: object, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)
