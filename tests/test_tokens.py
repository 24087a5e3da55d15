"""Tokens: `usermgr verify` against hostile tokens, the key file, EdDSA, interop and start-up.

Offline verification needs no database, so most tests here use `offline`, a runner whose
database does not exist: they run once, and prove that `verify` never opens a database.
Tests that need users (`init`, `login`) use the suite's `run` and so run on both backends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import stat
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwk
from jwcrypto import jwt as jwcrypto_jwt
from jwcrypto.jws import InvalidJWSSignature

from tests.conftest import (
    HANG_TIMEOUT,
    USERMGR,
    Runner,
    create_user,
    login,
    process_env,
    run_usermgr,
    shown,
    token_of,
    uid_of,
)
from usermgr import keyring, tokens
from usermgr.config import Settings, load_settings
from usermgr.errors import ConfigurationError

ISSUER = "usermgr"
CLAIM_KEYS = {"sub", "email", "roles", "iss", "iat", "exp", "jti", "ver"}
NOT_ADMIN = "usermgr: error: forbidden: the token's holder does not have the role 'admin'\n"


# ---- helpers ---------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_of(key_file: Path) -> bytes:
    """The HS256 secret exactly as usermgr uses it: the key file's bytes, stripped."""
    return key_file.read_bytes().strip()


def claims(now: int, **changes: Any) -> dict[str, Any]:
    """The claims usermgr issues, with some changed; a change to None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "1",
        "email": "ada@example.com",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 600,
        "jti": "0123456789abcdef0123456789abcdef",
        "ver": 0,
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def signed(secret: bytes, now: int, algorithm: str = "HS256", **changes: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # HS512 wants 64 bytes
        return jwt.encode(claims(now, **changes), secret, algorithm=algorithm)


def hs256_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made without PyJWT, which refuses a PEM key as an HMAC secret:
    exactly what an attacker holding the public key would forge."""
    signing_input = (
        f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(payload).encode())}"
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def tampered_payload(secret: bytes, now: int) -> str:
    header, _payload, signature = signed(secret, now, roles=[]).split(".")
    return f"{header}.{b64url(json.dumps(claims(now, roles=['admin'])).encode())}.{signature}"


def flipped_signature_byte(secret: bytes, now: int) -> str:
    """Flip a bit of the decoded signature: flipping the last base64 character may only
    touch padding bits, which decoders ignore, and leave the signature intact."""
    header, payload, signature = signed(secret, now).split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def payload_not_an_object(secret: bytes, _now: int) -> str:
    return jwt.api_jws.PyJWS().encode(b"[1, 2, 3]", secret, algorithm="HS256")


def payload_not_utf8(secret: bytes, now: int) -> str:
    """A lone surrogate where the payload goes: what Python makes of a non-UTF-8 argument."""
    header, _payload, signature = signed(secret, now).split(".")
    return f"{header}.\udcff.{signature}"


def assert_token_invalid(result: Result, reason: str) -> None:
    """Exit 7, nothing on stdout, exactly one `usermgr: error: token invalid: ...` line (so no traceback)."""
    assert result.exit_code == 7, result.stderr
    assert result.stdout == ""
    assert result.stderr == f"usermgr: error: token invalid: {reason}\n"


def uid_number(n: int) -> str:
    """A stable identity for test user number `n`, in the form `uid` takes."""
    return str(uuid.UUID(int=n))


def issue(
    settings: Settings, *, subject: str = uid_number(1), email: str = "ada@example.com", roles: list[str] | None = None
) -> str:
    """A good token, minted by usermgr's own issuer (no database needed)."""
    return tokens.issue_token(
        settings, subject=subject, email=email, roles=roles if roles is not None else [], token_version=0, ttl=600
    )


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def offline_env(tmp_path: Path, key_file: Path) -> dict[str, str]:
    """An environment with a key file and a database that does not exist."""
    return {
        "USERMGR_DATABASE_URL": str(tmp_path / "absent" / "users.db"),
        "USERMGR_KEY_FILE": str(key_file),
        "USERMGR_HASH_PROFILE": "test",
    }


@pytest.fixture
def offline(offline_env: dict[str, str]) -> Runner:
    return Runner(offline_env)


@pytest.fixture
def hs_settings(key_file: Path) -> Settings:
    return load_settings(key_file=str(key_file))


@pytest.fixture
def ed_key(tmp_path: Path) -> Path:
    """An EdDSA key file and its `.pub`, made the way `usermgr init` makes them."""
    path = tmp_path / "ed.key"
    assert tokens.create_key_file(path, "EdDSA")
    return path


# ---- the hostile-token corpus ----------------------------------------------------------------

Mint = Callable[[bytes, int], str]

HOSTILE: dict[str, tuple[Mint, str]] = {
    "alg-none-unsigned": (lambda s, now: jwt.encode(claims(now), None, algorithm="none"), "algorithm not allowed"),
    "hs512-when-hs256-is-pinned": (lambda s, now: signed(s, now, "HS512"), "algorithm not allowed"),
    "tampered-payload": (tampered_payload, "bad signature"),
    "flipped-signature-byte": (flipped_signature_byte, "bad signature"),
    "signed-with-another-key": (lambda s, now: signed(b"another-secret-" * 4, now), "bad signature"),
    "expired": (lambda s, now: signed(s, now, iat=now - 7200, exp=now - 3600), "expired"),
    "nbf-in-the-future": (lambda s, now: signed(s, now, nbf=now + 3600), "not yet valid"),
    "iat-in-the-future": (lambda s, now: signed(s, now, iat=now + 3600, exp=now + 7200), "not yet valid"),
    "missing-exp": (lambda s, now: signed(s, now, exp=None), "missing claim 'exp'"),
    "missing-iat": (lambda s, now: signed(s, now, iat=None), "missing claim 'iat'"),
    "missing-iss": (lambda s, now: signed(s, now, iss=None), "missing claim 'iss'"),
    "missing-sub": (lambda s, now: signed(s, now, sub=None), "missing claim 'sub'"),
    "wrong-issuer": (lambda s, now: signed(s, now, iss="someone-else"), "wrong issuer"),
    "audience-when-none-is-configured": (lambda s, now: signed(s, now, aud="other-app"), "wrong audience"),
    "roles-not-a-list": (lambda s, now: signed(s, now, roles="admin"), "malformed"),
    "version-not-a-number": (lambda s, now: signed(s, now, ver="0"), "malformed"),
    "sub-not-a-string": (lambda s, now: signed(s, now, sub=1), "malformed"),
    "payload-not-an-object": (payload_not_an_object, "malformed"),
    "payload-not-utf-8": (payload_not_utf8, "malformed"),
    "100kb-signed": (lambda s, now: signed(s, now, padding="x" * 100_000), "malformed"),
    "100kb-garbage": (lambda s, now: "a" * 100_000, "malformed"),
    "empty-string": (lambda s, now: "", "malformed"),
    "whitespace": (lambda s, now: " \t ", "malformed"),
    "three-dots": (lambda s, now: "...", "malformed"),
    "a.b.c": (lambda s, now: "a.b.c", "malformed"),
    "two-segments": (lambda s, now: signed(s, now).rsplit(".", 1)[0], "malformed"),
    "four-segments": (lambda s, now: signed(s, now) + ".e30", "malformed"),
    "bearer-prefix": (lambda s, now: "Bearer " + signed(s, now), "malformed"),
    "header-not-json": (lambda s, now: f"{b64url(b'not json')}.{b64url(b'{}')}.c2ln", "malformed"),
    "not-base64": (lambda s, now: "!!!.###.$$$", "malformed"),
    "unicode": (lambda s, now: "ünïcødé.tøkén.☃", "malformed"),
    "nul-byte": (lambda s, now: "eyJ\x00.e30.", "malformed"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_token_is_refused(offline: Runner, key_file: Path, case: str) -> None:
    mint, reason = HOSTILE[case]
    token = mint(secret_of(key_file), int(time.time()))
    assert_token_invalid(offline("verify", token), reason)
    assert_token_invalid(offline("verify", token, "-o", "json"), reason)


def test_the_leeway_setting_forgives_clock_skew_and_no_more(offline: Runner, key_file: Path) -> None:
    """A token expired a minute ago passes with a two-minute leeway and fails without one
    (margins of a minute, so a slow machine cannot tip either answer)."""
    now = int(time.time())
    token = signed(secret_of(key_file), now, iat=now - 3600, exp=now - 60)
    assert offline("verify", token, env={"USERMGR_TOKEN_LEEWAY": "120"}).exit_code == 0
    assert_token_invalid(offline("verify", token, env={"USERMGR_TOKEN_LEEWAY": "0"}), "expired")


@pytest.mark.parametrize(
    "aud, reason",
    [("other-app", "wrong audience"), (["other-app", "third"], "wrong audience"), (None, "missing claim 'aud'")],
)
def test_wrong_audience_is_refused(offline: Runner, key_file: Path, aud: Any, reason: str) -> None:
    token = signed(secret_of(key_file), int(time.time()), aud=aud)
    assert_token_invalid(offline("verify", token, env={"USERMGR_TOKEN_AUDIENCE": "my-app"}), reason)


def test_configured_audience_is_issued_and_accepted(offline: Runner, hs_settings: Settings) -> None:
    token = issue(replace(hs_settings, token_audience="my-app"))
    result = offline("verify", token, "-o", "json", env={"USERMGR_TOKEN_AUDIENCE": "my-app"})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["aud"] == "my-app"
    assert_token_invalid(offline("verify", token, env={"USERMGR_TOKEN_AUDIENCE": "another-app"}), "wrong audience")


@pytest.mark.parametrize("how", ["configured-key-file", "public-key-only"])
@pytest.mark.parametrize("case", ["hs256-signed-with-the-public-key-pem", "alg-none", "another-ed25519-key"])
def test_eddsa_refuses_forged_tokens(tmp_path: Path, ed_key: Path, how: str, case: str) -> None:
    """The classic key-confusion attack: HMAC with the public key as the secret."""
    now = int(time.time())
    public_pem = tokens.public_key_path(ed_key).read_bytes()
    other = tmp_path / "other.key"
    tokens.create_key_file(other, "EdDSA")
    token = {
        "hs256-signed-with-the-public-key-pem": lambda: hs256_by_hand(claims(now), public_pem),
        "alg-none": lambda: jwt.encode(claims(now), None, algorithm="none"),
        "another-ed25519-key": lambda: jwt.encode(claims(now), other.read_bytes(), algorithm="EdDSA"),
    }[case]()
    reason = "bad signature" if case == "another-ed25519-key" else "algorithm not allowed"
    env = {"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_TOKEN_ALGORITHM": "EdDSA"}
    if how == "configured-key-file":
        result = Runner({**env, "USERMGR_KEY_FILE": str(ed_key)})("verify", token)
    else:
        runner = Runner({**env, "USERMGR_KEY_FILE": str(tmp_path / "no-such.key")})
        result = runner("verify", "--public-key", str(tokens.public_key_path(ed_key)), token)
    assert_token_invalid(result, reason)


# ---- the hostile corpus for the key ring: kid, jku, x5u, a JWK Set ------------------------------


@dataclass(frozen=True)
class RingCase:
    """A key ring (RS256 active, ES256 next, an EdDSA key retired) and an attacker's key."""

    key_file: Path
    jwks_file: Path
    rs256: keyring.RingKey
    es256: keyring.RingKey
    retired: keyring.RingKey
    attacker: keyring.RingKey


@pytest.fixture
def ring_case(tmp_path: Path) -> RingCase:
    key_file = tmp_path / "ring.key"
    tokens.create_key_file(key_file, "RS256")
    keyring.change_ring(key_file, None, keyring.add_key("ES256"))
    (added,) = keyring.change_ring(key_file, None, keyring.add_key("EdDSA"))
    before = keyring.load_ring(key_file, None)
    keyring.change_ring(key_file, None, keyring.retire_key(added.kid))
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(keyring.public_jwks(keyring.load_ring(key_file, None))))
    rs256, es256 = keyring.load_ring(key_file, None).keys
    other = tmp_path / "attacker.key"
    tokens.create_key_file(other, "ES256")
    attacker = keyring.load_ring(other, None).active
    return RingCase(key_file, jwks_file, rs256, es256, before.get(added.kid), attacker)


def with_header(payload: dict[str, Any], key: keyring.RingKey, **header: Any) -> str:
    return jwt.encode(payload, key.signer, algorithm=key.alg, headers=header)


def hmac_with_header(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses a PEM as an HMAC secret), with any header."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def signed_by_hand(header: dict[str, Any], payload: dict[str, Any], key: keyring.RingKey) -> str:
    """Signed with `key`, whatever the header holds (PyJWT refuses to write a kid that is not a string)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(key.signer.Algorithm.sign(signing_input.encode(), key.signer.key))}"


RingMint = Callable[[RingCase, int], str]
HOSTILE_KIDS: dict[str, tuple[RingMint, str]] = {
    "kid-naming-no-key": (lambda r, now: with_header(claims(now), r.rs256, kid="no-such-key"), "unknown key"),
    "kid-naming-a-retired-key": (lambda r, now: with_header(claims(now), r.retired, kid=r.retired.kid), "unknown key"),
    "hs256-header-rs256-kid-signed-with-the-public-pem": (
        lambda r, now: hmac_with_header(
            {"alg": "HS256", "kid": r.rs256.kid, "typ": "JWT"}, claims(now), r.rs256.public_pem().encode()
        ),
        "algorithm not allowed",
    ),
    "hs256-header-rs256-kid-signed-with-the-public-jwk": (
        lambda r, now: hmac_with_header(
            {"alg": "HS256", "kid": r.rs256.kid}, claims(now), json.dumps(r.rs256.public_jwk).encode()
        ),
        "algorithm not allowed",
    ),
    "rs256-signed-under-the-es256-kid": (
        lambda r, now: with_header(claims(now), r.rs256, kid=r.es256.kid),
        "algorithm not allowed",
    ),
    "alg-none-with-a-real-kid": (
        lambda r, now: jwt.encode(claims(now), None, algorithm="none", headers={"kid": r.rs256.kid}),
        "algorithm not allowed",
    ),
    "kid-path-traversal": (
        lambda r, now: with_header(claims(now), r.attacker, kid="../../../../dev/null"),
        "unknown key",
    ),
    "kid-absolute-path-of-the-ring": (
        lambda r, now: with_header(claims(now), r.attacker, kid=str(r.key_file)),
        "unknown key",
    ),
    "kid-sql": (lambda r, now: with_header(claims(now), r.attacker, kid="' OR '1'='1' --"), "unknown key"),
    "kid-not-a-string": (
        lambda r, now: signed_by_hand({"alg": "RS256", "kid": [r.rs256.kid]}, claims(now), r.rs256),
        "malformed",
    ),
    "no-kid-and-no-pre-ring-key": (
        lambda r, now: jwt.encode(claims(now), r.rs256.signer, algorithm="RS256"),
        "unknown key",
    ),
    "jku-elsewhere-with-its-own-key": (
        lambda r, now: with_header(
            claims(now), r.attacker, kid=r.attacker.kid, jku="https://attacker.example/jwks.json"
        ),
        "unknown key",
    ),
    "x5u-elsewhere-under-our-kid": (
        lambda r, now: with_header(claims(now), r.attacker, kid=r.es256.kid, x5u="https://attacker.example/cert.pem"),
        "bad signature",
    ),
    "jwk-header-with-its-own-key": (
        lambda r, now: with_header(claims(now), r.attacker, kid=r.es256.kid, jwk=r.attacker.public_jwk),
        "bad signature",
    ),
}


@pytest.mark.parametrize("how", ["key-ring", "jwks"])
@pytest.mark.parametrize("case", HOSTILE_KIDS, ids=list(HOSTILE_KIDS))
def test_hostile_kid_is_refused(tmp_path: Path, ring_case: RingCase, case: str, how: str) -> None:
    mint, reason = HOSTILE_KIDS[case]
    token = mint(ring_case, int(time.time()))
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(ring_case.key_file)})
    options = ["--jwks", str(ring_case.jwks_file)] if how == "jwks" else []
    assert_token_invalid(runner("verify", *options, token), reason)
    good = with_header(claims(int(time.time())), ring_case.rs256, kid=ring_case.rs256.kid)
    assert runner("verify", *options, good).exit_code == 0, "the same verifier accepts the real thing"


def test_a_kid_that_several_keys_of_a_jwk_set_share_names_none(tmp_path: Path, ring_case: RingCase) -> None:
    """Duplicate kids in a JWK Set: neither key is chosen (no trying both), the other kids still work."""
    published = json.loads(ring_case.jwks_file.read_text())
    impostor = {**ring_case.attacker.public_jwk, "kid": ring_case.es256.kid}
    ring_case.jwks_file.write_text(json.dumps({"keys": [*published["keys"], impostor]}))
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(tmp_path / "none")})
    now = int(time.time())
    for signer in (ring_case.es256, ring_case.attacker):
        token = with_header(claims(now), signer, kid=ring_case.es256.kid)
        result = runner("verify", "--jwks", str(ring_case.jwks_file), token)
        assert_token_invalid(result, "ambiguous key (several keys of the JWK Set share its kid)")
    other = with_header(claims(now), ring_case.rs256, kid=ring_case.rs256.kid)
    assert runner("verify", "--jwks", str(ring_case.jwks_file), other).exit_code == 0


def test_public_key_and_jwks_cannot_be_mixed(tmp_path: Path, ring_case: RingCase, ed_key: Path) -> None:
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(tmp_path / "none")})
    public = str(tokens.public_key_path(ed_key))
    result = runner("verify", "--public-key", public, "--jwks", str(ring_case.jwks_file), "a.b.c")
    assert result.exit_code == 2
    assert result.stderr.startswith("usermgr: error: --public-key and --jwks cannot be used together")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("not json", "is not JSON"),
        ('{"keys": {}}', 'needs a "keys" list'),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}', "a secret (oct) key"),
    ],
    ids=["not-json", "keys-not-a-list", "a-secret-in-it"],
)
def test_an_unusable_jwks_file_is_exit_2(tmp_path: Path, content: str, expected: str) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(content)
    runner = Runner({"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(tmp_path / "none")})
    result = runner("verify", "--jwks", str(jwks_file), "a.b.c")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr


# ---- a valid token ---------------------------------------------------------------------------


def test_valid_token_prints_its_claims(offline: Runner, hs_settings: Settings) -> None:
    token = issue(hs_settings, subject=uid_number(7), email="ada@example.com", roles=["admin", "beta"])
    result = offline("verify", token, "-o", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    printed = json.loads(result.stdout)
    assert printed.keys() >= CLAIM_KEYS
    assert (printed["sub"], printed["email"], printed["roles"], printed["iss"], printed["ver"]) == (
        uid_number(7),
        "ada@example.com",
        ["admin", "beta"],
        ISSUER,
        0,
    )
    assert printed["exp"] - printed["iat"] == 600
    assert len(printed["jti"]) == 32
    table = offline("verify", token)
    assert table.exit_code == 0
    assert "ada@example.com" in table.stdout and "admin, beta" in table.stdout


def test_a_token_names_its_key_and_type(hs_settings: Settings) -> None:
    """The header says which key of the ring signed (`kid`, so a ring of several verifies it) and
    that it is a JWT, as RFC 7519 has it for verifiers that check `typ`."""
    kid = tokens.key_ring(hs_settings).active.kid
    assert jwt.get_unverified_header(issue(hs_settings)) == {"alg": "HS256", "kid": kid, "typ": "JWT"}


def test_each_token_gets_a_new_jti(hs_settings: Settings) -> None:
    first, second = (jwt.decode(issue(hs_settings), options={"verify_signature": False}) for _ in range(2))
    assert first["jti"] != second["jti"]


def test_role_is_required(offline: Runner, hs_settings: Settings) -> None:
    member = offline("verify", issue(hs_settings, roles=["beta"]), "--role", "admin")
    assert member.exit_code == 8
    assert member.stdout == ""
    assert member.stderr == NOT_ADMIN
    admin = offline("verify", issue(hs_settings, roles=["admin"]), "--role", "admin", "-o", "email")
    assert admin.exit_code == 0, admin.stderr
    assert admin.stdout == "ada@example.com\n"


def test_several_tokens_on_the_command_line(offline: Runner, hs_settings: Settings) -> None:
    good = issue(hs_settings, email="ada@example.com")
    result = offline("verify", good, "garbage", issue(hs_settings, email="bob@example.com"), "-o", "email")
    assert result.exit_code == 7
    assert result.stdout == "ada@example.com\nbob@example.com\n"
    assert result.stderr == "usermgr: error: token invalid: malformed\n"


@pytest.mark.parametrize("how", ["arguments", "stdin"])
def test_any_invalid_token_wins_over_a_missing_role_in_any_order(
    offline: Runner, hs_settings: Settings, how: str
) -> None:
    """Exit 7 when any token is invalid, even after one without the role (8) came first."""
    no_role, bad = issue(hs_settings, roles=["beta"]), "garbage"
    for order in ([no_role, bad], [bad, no_role]):
        if how == "arguments":
            result = offline("verify", *order, "--role", "admin", "-o", "email")
        else:
            result = offline("verify", "-", "--role", "admin", input="".join(t + "\n" for t in order))
        assert result.exit_code == 7, (order, result.stderr)


def stream(offline: Runner, lines: list[str], *args: str) -> tuple[Result, list[dict[str, Any]]]:
    result = offline("verify", "-", *args, input="".join(line + "\n" for line in lines))
    return result, [json.loads(line) for line in result.stdout.splitlines()]


def test_stream_of_valid_tokens(offline: Runner, hs_settings: Settings) -> None:
    emails = ["ada@example.com", "bob@example.com", "cy@example.com"]
    result, rows = stream(
        offline, [issue(hs_settings, subject=uid_number(n), email=e) for n, e in enumerate(emails, 1)]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert [set(row) for row in rows] == [{"valid", "reason", "claims"}] * 3
    assert [(row["valid"], row["reason"], row["claims"]["email"]) for row in rows] == [(True, None, e) for e in emails]
    assert all(row["claims"].keys() >= CLAIM_KEYS for row in rows)


def test_stream_reports_each_line_and_exits_7_on_any_invalid(
    offline: Runner, hs_settings: Settings, key_file: Path
) -> None:
    expired = signed(secret_of(key_file), int(time.time()), iat=1, exp=2)
    lines = [issue(hs_settings, roles=["admin"]), "garbage", expired, issue(hs_settings, roles=[])]
    result, rows = stream(offline, lines, "--role", "admin")
    assert result.exit_code == 7
    assert [(row["valid"], row["reason"]) for row in rows] == [
        (True, None),
        (False, "token invalid: malformed"),
        (False, "token invalid: expired"),
        (False, "forbidden: the token's holder does not have the role 'admin'"),
    ]
    assert [row["claims"] is None for row in rows] == [False, True, True, True]


def test_stream_exits_8_when_only_roles_are_missing(offline: Runner, hs_settings: Settings) -> None:
    lines = [issue(hs_settings, roles=[]), issue(hs_settings, roles=["admin"]), issue(hs_settings, roles=["beta"])]
    result, rows = stream(offline, lines, "--role", "admin")
    assert result.exit_code == 8
    assert [row["valid"] for row in rows] == [False, True, False]


def test_stream_with_email_output_prints_only_the_valid(offline: Runner, hs_settings: Settings) -> None:
    lines = [issue(hs_settings, email="ada@example.com"), "garbage", issue(hs_settings, email="bob@example.com")]
    result = offline("verify", "-", "-o", "email", input="\n".join(lines) + "\n")
    assert result.exit_code == 7
    assert result.stdout == "ada@example.com\nbob@example.com\n"


def test_stream_cannot_be_mixed_with_tokens(offline: Runner, hs_settings: Settings) -> None:
    result = offline("verify", "-", issue(hs_settings), input="")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usermgr: error: `-` reads tokens from standard input")


@pytest.mark.parametrize("args", [(), ("-",)], ids=["no-argument", "dash"])
def test_no_token_at_all_is_not_success(offline: Runner, args: tuple[str, ...]) -> None:
    """`usermgr verify $TOKEN --role admin && grant` with an empty, unquoted $TOKEN must not grant."""
    result = offline("verify", *args, "--role", "admin", input="")
    assert result.exit_code != 0
    assert result.stderr.startswith("usermgr: error: ")


# ---- the key file ----------------------------------------------------------------------------


def test_init_creates_the_key_file_with_mode_0600(run: Runner, tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    result = run("init", env={"USERMGR_KEY_FILE": str(path)})
    assert result.exit_code == 0, result.stderr
    assert f"created key file {path} (mode 0600)" in result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = secret_of(path)
    assert re.fullmatch(rb"[A-Za-z0-9_-]{43}", secret), secret  # 32 bytes in base64url, unpadded (as JWK's k)
    assert len(b64url_decode(secret.decode())) == 32
    again = run("init", env={"USERMGR_KEY_FILE": str(path)})
    assert again.exit_code == 0, again.stderr
    assert "created key file" not in again.stderr
    assert secret_of(path) == secret


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(
    offline: Runner, hs_settings: Settings, key_file: Path, mode: int
) -> None:
    token = issue(hs_settings)
    key_file.chmod(mode)
    result = offline("verify", token)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("usermgr: error: ")
    assert f"chmod 600 {key_file}" in result.stderr


def test_key_file_readable_by_others_is_refused_for_login(run: Runner, key_file: Path) -> None:
    create_user(run, "ada@example.com")
    key_file.chmod(0o644)
    result = login(run, "ada@example.com")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "chmod 600" in result.stderr


def test_unusable_key_file_on_login_changes_nothing(run: Runner, key_file: Path) -> None:
    create_user(run, "ada@example.com")
    key_file.chmod(0o644)
    assert login(run, "ada@example.com").exit_code == 2
    assert shown(run, "ada@example.com")["last_login_at"] is None


def test_missing_key_file_is_a_clear_error(offline: Runner, tmp_path: Path) -> None:
    path = tmp_path / "nowhere.key"
    result = offline("verify", "a.b.c", env={"USERMGR_KEY_FILE": str(path)})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"usermgr: error: no key file at {path}: run `usermgr init` to create one, or set USERMGR_SECRET_KEY\n"
    )


def test_secret_key_overrides_the_key_file(offline: Runner, key_file: Path) -> None:
    secret = "an-application-secret-of-40-bytes-long!!"
    now = int(time.time())
    env = {"USERMGR_SECRET_KEY": secret}
    by_secret = offline("verify", signed(secret.encode(), now), "-o", "email", env=env)
    assert by_secret.exit_code == 0, by_secret.stderr
    assert by_secret.stdout == "ada@example.com\n"
    assert_token_invalid(offline("verify", signed(secret_of(key_file), now), env=env), "bad signature")
    no_file = offline(
        "verify", signed(secret.encode(), now), env={**env, "USERMGR_KEY_FILE": "/nonexistent/usermgr.key"}
    )
    assert no_file.exit_code == 0, no_file.stderr


def test_login_signs_with_the_secret_key(run: Runner) -> None:
    secret = "an-application-secret-of-40-bytes-long!!"
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com", env={"USERMGR_SECRET_KEY": secret, "USERMGR_KEY_FILE": "/nonexistent/k"})
    decoded = jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER)
    assert decoded["email"] == "ada@example.com"


@pytest.mark.parametrize("length", [1, 16, 31])
def test_short_secret_is_refused(offline: Runner, length: int) -> None:
    result = offline("verify", "a.b.c", env={"USERMGR_SECRET_KEY": "s" * length})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "usermgr: error: the HS256 secret is shorter than 32 bytes: use a longer one\n"


def test_secret_of_exactly_32_bytes_is_accepted(offline: Runner) -> None:
    secret = "s" * 32
    result = offline("verify", signed(secret.encode(), int(time.time())), env={"USERMGR_SECRET_KEY": secret})
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("source", ["USERMGR_SECRET_KEY", "key file"])
def test_a_pem_key_signs_with_its_own_algorithm(tmp_path: Path, source: str) -> None:
    """The algorithm belongs to the key: an Ed25519 PEM signs EdDSA though USERMGR_TOKEN_ALGORITHM says HS256."""
    pem_file = tmp_path / "ed25519.key"
    tokens.create_key_file(pem_file, "EdDSA")
    settings = load_settings(database_url=f"sqlite:///{tmp_path / 'users.db'}", key_file=str(pem_file))
    if source == "USERMGR_SECRET_KEY":
        settings = replace(settings, secret_key=pem_file.read_text(), key_file=tmp_path / "absent.key")
    assert settings.token_algorithm == "HS256"
    token = issue(settings)
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    public = serialization.load_pem_public_key(tokens.public_key_path(pem_file).read_bytes())
    assert jwt.decode(token, public, algorithms=["EdDSA"], issuer=ISSUER)["email"] == "ada@example.com"


def test_short_key_file_is_refused(offline: Runner, tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(b"too-short\n")
    path.chmod(0o600)
    result = offline("verify", "a.b.c", env={"USERMGR_KEY_FILE": str(path)})
    assert result.exit_code == 2
    assert "shorter than 32 bytes" in result.stderr


def test_eddsa_key_file_needs_no_algorithm_setting(run: Runner, tmp_path: Path) -> None:
    """A key made for EdDSA while USERMGR_TOKEN_ALGORITHM is left at HS256: it signs EdDSA,
    and `verify` with it asks for no variable (the key says what it is)."""
    path = tmp_path / "ed.key"
    tokens.create_key_file(path, "EdDSA")
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com", env={"USERMGR_KEY_FILE": str(path)})
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    result = run("verify", token, "-o", "email", env={"USERMGR_KEY_FILE": str(path)})
    assert (result.exit_code, result.stdout, result.stderr) == (0, "ada@example.com\n", "")


# ---- EdDSA -----------------------------------------------------------------------------------


@pytest.fixture
def eddsa(run: Runner, tmp_path: Path) -> tuple[Runner, Path]:
    """A runner configured for EdDSA on the test database, after `init` made its key."""
    path = tmp_path / "ed25519.key"
    runner = Runner({**run.env, "USERMGR_TOKEN_ALGORITHM": "EdDSA", "USERMGR_KEY_FILE": str(path)})
    result = runner("init")
    assert result.exit_code == 0, result.stderr
    return runner, path


def test_init_creates_an_ed25519_key_pair(eddsa: tuple[Runner, Path]) -> None:
    _runner, path = eddsa
    public = tokens.public_key_path(path)
    assert public.name == "ed25519.key.pub"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_eddsa_token_verifies_with_only_the_public_key(eddsa: tuple[Runner, Path], tmp_path: Path) -> None:
    runner, path = eddsa
    create_user(runner, "ada@example.com", "--role", "beta")
    token = token_of(runner, "ada@example.com")
    assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
    verifier_env = {  # a process with no private key, no secret and no database
        "USERMGR_KEY_FILE": str(tmp_path / "no-such.key"),
        "USERMGR_DATABASE_URL": str(tmp_path / "no-such.db"),
    }
    public = str(tokens.public_key_path(path))
    result = run_usermgr("verify", "--public-key", public, token, "-o", "json", env=verifier_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["email"] == "ada@example.com"
    role = run_usermgr("verify", "--public-key", public, token, "--role", "beta", "-o", "email", env=verifier_env)
    assert (role.returncode, role.stdout) == (0, "ada@example.com\n")
    cannot_sign = run_usermgr("verify", token, env=verifier_env)
    assert cannot_sign.returncode == 2
    assert "no key file" in cannot_sign.stderr
    hs256 = jwt.encode(claims(int(time.time())), b"a-secret-this-verifier-never-saw-0123456789", algorithm="HS256")
    refused = run_usermgr("verify", "--public-key", public, hs256, env=verifier_env)
    assert refused.returncode == 7
    assert refused.stdout == ""
    assert refused.stderr == "usermgr: error: token invalid: algorithm not allowed\n"


def test_eddsa_token_is_refused_by_a_ring_without_its_key(eddsa: tuple[Runner, Path], run: Runner) -> None:
    runner, _path = eddsa
    create_user(runner, "ada@example.com")
    assert_token_invalid(run("verify", token_of(runner, "ada@example.com")), "unknown key")


def test_a_public_key_verifies_the_tokens_that_name_it_in_process(eddsa: tuple[Runner, Path], offline: Runner) -> None:
    """The token carries its key's kid, and the public key's set must find the key by that kid:
    the subprocess test above cannot see a mutant of `pem_key_set`, this one runs in process."""
    runner, path = eddsa
    create_user(runner, "ada@example.com")
    token = token_of(runner, "ada@example.com")
    public = tokens.public_key_path(path)
    assert jwt.get_unverified_header(token)["kid"] == keyring.pem_key_set(public).for_token(token).kid
    result = offline("verify", "--public-key", str(public), token, "-o", "email")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "ada@example.com\n", "")


def test_unreadable_public_key_says_why(tmp_path: Path) -> None:
    """`verify --public-key` has click check that the file exists; one it then cannot read (a mode
    that root ignores, so a symlink loop stands in for it here; a directory) is a configuration
    error (exit 2)."""
    loop = tmp_path / "loop.pem"
    loop.symlink_to(loop)
    for path, expected in (
        (loop, f"cannot read public key {loop}: Too many levels of symbolic links"),
        (tmp_path, f"public key {tmp_path} is a directory"),
    ):
        with pytest.raises(ConfigurationError) as refused:
            keyring.pem_key_set(path)
        assert str(refused.value) == expected


def test_public_key_that_is_not_a_public_key_is_refused(offline: Runner, key_file: Path) -> None:
    result = offline("verify", "--public-key", str(key_file), "a.b.c")
    assert result.exit_code == 2
    assert result.stderr == (
        f"usermgr: error: public key {key_file} is not a PEM public key usermgr verifies with:"
        " Ed25519, P-256 or RSA (2048 bits or more)\n"
    )


# ---- interop ---------------------------------------------------------------------------------


def test_jwcrypto_token_verifies_with_usermgr(offline: Runner, key_file: Path) -> None:
    key = jwk.JWK(kty="oct", k=b64url(secret_of(key_file)))
    token = jwcrypto_jwt.JWT(header={"alg": "HS256", "typ": "JWT"}, claims=claims(int(time.time())))
    token.make_signed_token(key)
    result = offline("verify", token.serialize(), "-o", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["email"] == "ada@example.com"


def test_usermgr_token_verifies_with_jwcrypto(run: Runner, key_file: Path) -> None:
    user_id = create_user(run, "ada@example.com", "--admin")
    token = token_of(run, "ada@example.com")
    key = jwk.JWK(kty="oct", k=b64url(secret_of(key_file)))
    checked = jwcrypto_jwt.JWT(jwt=token, key=key, algs=["HS256"], check_claims={"iss": ISSUER, "exp": None})
    decoded = json.loads(checked.claims)
    assert (decoded["sub"], decoded["email"], decoded["roles"]) == (
        uid_of(run, str(user_id)),
        "ada@example.com",
        ["admin"],
    )
    with pytest.raises(InvalidJWSSignature):
        jwcrypto_jwt.JWT(jwt=token, key=jwk.JWK(kty="oct", k=b64url(b"x" * 32)), algs=["HS256"])


def test_usermgr_eddsa_token_verifies_with_jwcrypto(eddsa: tuple[Runner, Path]) -> None:
    runner, path = eddsa
    create_user(runner, "ada@example.com")
    key = jwk.JWK.from_pem(tokens.public_key_path(path).read_bytes())
    checked = jwcrypto_jwt.JWT(jwt=token_of(runner, "ada@example.com"), key=key, algs=["EdDSA"])
    assert json.loads(checked.claims)["email"] == "ada@example.com"


# ---- start-up: `verify` and `--help` load neither SQLAlchemy nor pydantic --------------------

PROBE = """
import json, sys
from usermgr.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
with open(sys.argv[1], "w") as out:
    json.dump({name: name in sys.modules for name in ("sqlalchemy", "pydantic")}, out)
"""


def import_chain(args: list[str], env: dict[str, str]) -> str:
    """Who imported sqlalchemy or pydantic first, from `python -X importtime` (for the failure message)."""
    code = f"from usermgr.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
    lines = subprocess.run(
        [str(USERMGR.with_name("python")), "-X", "importtime", "-c", code],
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    ).stderr.splitlines()
    first = next(
        (i for i, line in enumerate(lines) if line.split("|")[-1].strip().startswith(("sqlalchemy", "pydantic"))), None
    )
    if first is None:
        return "(no import found)"
    chain, depth = [], len(lines[first].split("|")[-1]) - len(lines[first].split("|")[-1].lstrip())
    for line in lines[first:]:
        name = line.split("|")[-1]
        indent = len(name) - len(name.lstrip())
        if indent <= depth:
            chain.append(name.strip())
            depth = indent - 1
    return " <- ".join(chain)


@pytest.mark.e2e
@pytest.mark.parametrize("what", ["verify-valid", "verify-invalid", "verify-stream", "help", "verify-help"])
def test_start_up_loads_no_database_layer(
    offline_env: dict[str, str], hs_settings: Settings, tmp_path: Path, what: str
) -> None:
    token = issue(hs_settings)
    args = {
        "verify-valid": ["verify", token, "--role", "admin", "-o", "json"],
        "verify-invalid": ["verify", "garbage"],
        "verify-stream": ["verify", "-"],
        "help": ["--help"],
        "verify-help": ["verify", "--help"],
    }[what]
    report = tmp_path / "modules.json"
    probe = subprocess.run(
        [str(USERMGR.with_name("python")), "-c", PROBE, str(report), *args],
        env=process_env(offline_env),
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert "Traceback" not in probe.stderr
    loaded = json.loads(report.read_text())
    assert loaded == {"sqlalchemy": False, "pydantic": False}, import_chain(args, offline_env)


@pytest.mark.e2e
def test_installed_verify_exit_codes(offline_env: dict[str, str], hs_settings: Settings) -> None:
    good = run_usermgr("verify", issue(hs_settings), "-o", "email", env=offline_env)
    assert (good.returncode, good.stdout, good.stderr) == (0, "ada@example.com\n", "")
    forbidden = run_usermgr("verify", issue(hs_settings), "--role", "admin", env=offline_env)
    assert (forbidden.returncode, forbidden.stdout, forbidden.stderr) == (8, "", NOT_ADMIN)
    bad = run_usermgr("verify", "garbage", env=offline_env)
    assert (bad.returncode, bad.stdout, bad.stderr) == (7, "", "usermgr: error: token invalid: malformed\n")
