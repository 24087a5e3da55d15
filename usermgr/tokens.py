"""JWT issue and verify with PyJWT, and the signing keys.

Imports neither SQLAlchemy nor pydantic: `usermgr verify TOKEN` must start without them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import jwt

from usermgr.config import Settings
from usermgr.errors import ConfigurationError, Forbidden, TokenInvalid

if TYPE_CHECKING:  # cryptography is the optional `crypto` extra, loaded only for EdDSA
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SigningKey: TypeAlias = "bytes | Ed25519PrivateKey"
"""What mints tokens: the HS256 secret, or the Ed25519 private key."""
VerificationKey: TypeAlias = "bytes | Ed25519PublicKey"
"""What checks them: the HS256 secret, or the Ed25519 public key."""

REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub"]
MIN_SECRET_BYTES = 32
MAX_TOKEN_BYTES = 16 * 1024
VERSION_CLAIM = "ver"


# ---- keys -------------------------------------------------------------------------


def _new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


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
    and its public key beside it as `<key file>.pub` for services that only verify.
    Either the whole key appears or nothing does: a full disk leaves no empty or partial
    key file for a later run to trust, and an existing key is never replaced.
    """
    if path.exists():
        return False
    if algorithm == "EdDSA":
        private_pem, public_pem = _new_ed25519_pem()
    else:
        private_pem, public_pem = (_new_secret() + "\n").encode(), None
    try:
        if not _put_in_place(path, private_pem, 0o600, replace=False):
            return False  # another `init` created it first: theirs stands
        if public_pem is not None:
            try:
                _put_in_place(public_key_path(path), public_pem, 0o644, replace=True)
            except OSError:
                path.unlink()  # without its public half the pair is unfinished: the next `init` makes both
                raise
    except OSError as error:
        raise ConfigurationError(
            f"cannot create key file {path}: {error.strerror or error}; no key file was left behind"
        ) from None
    _sync_directory(path.parent)
    return True


def _put_in_place(target: Path, content: bytes, mode: int, *, replace: bool) -> bool:
    """Write `content` to a new file beside `target` (private from its creation), fsync it,
    then give it `target`'s name in one step. Without `replace` an existing `target` is
    kept (a hard link never overwrites) and the result is False. The temporary name is
    gone afterwards, whatever happened."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        if replace:
            os.replace(temporary, target)
            return True
        try:
            os.link(temporary, target)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Make the new name itself survive a crash; a file system that cannot sync a
    directory still has the key, so a failure here is not one."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_private_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigurationError(
            f"no key file at {path}: run `usermgr init` to create one, or set USERMGR_SECRET_KEY"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}): run `chmod 600 {path}`"
        )
    try:
        return path.read_bytes().strip()
    except OSError as error:
        raise ConfigurationError(f"cannot read key file {path}: {error.strerror}") from None


def _secret_material(settings: Settings) -> bytes:
    if settings.secret_key:
        return settings.secret_key.encode()
    if settings.key_file is None:
        raise ConfigurationError("no signing key: set USERMGR_SECRET_KEY, or give --key-file (USERMGR_KEY_FILE)")
    return _read_private_file(settings.key_file)


def _key_source(settings: Settings) -> str:
    return "USERMGR_SECRET_KEY" if settings.secret_key else f"key file {settings.key_file}"


def signing_key(settings: Settings) -> SigningKey:
    """The key that mints tokens: the HS256 secret, or the Ed25519 private key."""
    material = _secret_material(settings)
    if settings.token_algorithm == "EdDSA":
        return _load_pem(material, private=True, source=_key_source(settings))
    if material.startswith(b"-----BEGIN"):
        raise ConfigurationError(
            f"{_key_source(settings)} holds a PEM key, but USERMGR_TOKEN_ALGORITHM is HS256: set it to EdDSA"
        )
    if len(material) < MIN_SECRET_BYTES:
        raise ConfigurationError(f"the HS256 secret is shorter than {MIN_SECRET_BYTES} bytes: use a longer one")
    return material


def verification_key(settings: Settings, public_key_file: Path | None = None) -> tuple[VerificationKey, str]:
    """The key and the one algorithm tokens are checked with.

    A public key file pins EdDSA and needs no secret: a service can verify but never issue.
    """
    if public_key_file is not None:
        try:
            material = public_key_file.read_bytes()
        except OSError as error:
            raise ConfigurationError(f"cannot read public key {public_key_file}: {error.strerror}") from None
        return _load_pem(material, private=False, source=f"public key {public_key_file}"), "EdDSA"
    key = signing_key(settings)
    if isinstance(key, bytes):  # signing_key gives bytes exactly when the algorithm is HS256
        return key, "HS256"
    return key.public_key(), "EdDSA"


@overload
def _load_pem(material: bytes, *, private: Literal[True], source: str) -> Ed25519PrivateKey: ...
@overload
def _load_pem(material: bytes, *, private: Literal[False], source: str) -> Ed25519PublicKey: ...
def _load_pem(material: bytes, *, private: bool, source: str) -> Ed25519PrivateKey | Ed25519PublicKey:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigurationError("EdDSA needs the `crypto` extra: pip install 'usermgr[crypto]'") from None
    try:
        key: object = (
            serialization.load_pem_private_key(material, password=None)
            if private
            else serialization.load_pem_public_key(material)
        )
    except (ValueError, TypeError):
        raise ConfigurationError(f"{source} is not a PEM Ed25519 key, as EdDSA needs") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey):
        raise ConfigurationError(f"{source} is not an Ed25519 key, as EdDSA needs")
    return key


# ---- tokens -----------------------------------------------------------------------


def issue_token(
    settings: Settings,
    *,
    subject: str,
    email: str,
    roles: list[str],
    token_version: int,
    ttl: int,
    key: SigningKey | None = None,
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
    return jwt.encode(claims, key, algorithm=settings.token_algorithm, headers={"typ": "JWT"})


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
    token: str, settings: Settings, key: VerificationKey, algorithm: str, *, required_role: str | None = None
) -> dict[str, Any]:
    """The claims of a valid token; TokenInvalid with the reason, or Forbidden without the role."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise TokenInvalid("token invalid: malformed")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            leeway=settings.token_leeway,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as error:
        raise TokenInvalid(f"token invalid: {_reason(error)}") from None
    except (ValueError, TypeError):
        raise TokenInvalid("token invalid: malformed") from None
    roles = claims.get("roles")
    if not isinstance(roles, list) or not isinstance(claims.get(VERSION_CLAIM, 0), int):
        raise TokenInvalid("token invalid: malformed")
    if required_role is not None and required_role not in roles:
        raise Forbidden(f"forbidden: the token's holder does not have the role {required_role!r}")
    return claims
