"""The key ring: rotation without downtime, the `keys` commands, the ring file, JWKS and interop.

Rotation runs through the installed `usermgr` and a real `usermgr serve` (which must see
`keys` changes without a restart), for every algorithm and on both backends. Interop is
checked both ways with independent JOSE implementations (jwcrypto, joserfc) and with
PyJWT's `PyJWKClient` against the live `/.well-known/jwks.json`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import KeySet as JoserfcKeySet
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jwt as jwcrypto_jwt

from tests.conftest import (
    PASSWORD,
    Runner,
    api_token,
    bearer,
    create_user,
    ok,
    run_usermgr,
    serving,
    token_of,
)
from usermgr import api, keyring, tokens
from usermgr.config import load_settings
from usermgr.errors import ConfigurationError, Conflict, InvalidInput, NotFound, TokenInvalid

ALGORITHMS = ["HS256", "EdDSA", "ES256", "RS256"]
ASYMMETRIC = ["EdDSA", "ES256", "RS256"]
ISSUER = "usermgr"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "k", "oth"}


# ---- helpers -------------------------------------------------------------------------------------


def ring_env(env: dict[str, str], tmp_path: Path, alg: str = "HS256") -> dict[str, str]:
    """The suite's environment with a key ring of its own, made by `usermgr init` with `alg`."""
    ring = {**env, "USERMGR_KEY_FILE": str(tmp_path / "ring.key"), "USERMGR_TOKEN_ALGORITHM": alg}
    ok(run_usermgr("init", env=ring))
    return ring


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(ok(run_usermgr("keys", "list", "-o", "json", env=env)).stdout)
    return keys


def kid_of(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def refused(result: Any, code: int) -> str:
    """Exit `code`, nothing on stdout, one `usermgr: error:` line and no traceback; that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usermgr: error: "), result.stderr
    line: str = lines[0]
    return line


def offline_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with a database that does not exist: offline verification must not need one."""
    return {**env, "USERMGR_DATABASE_URL": str(tmp_path / "absent" / "users.db")}


def claims(now: int, **changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "sub": str(uuid.UUID(int=1)), "email": "ada@example.com", "roles": [], "iat": now}
    return {**base, "exp": now + 600, "jti": uuid.uuid4().hex, "ver": 0, **changes}


# ---- zero-downtime rotation --------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_rotation_keeps_earlier_tokens_valid_until_retire(env: dict[str, str], tmp_path: Path, alg: str) -> None:
    ring = ring_env(env, tmp_path, alg)
    offline = offline_env(ring, tmp_path)
    run = Runner(ring)
    create_user(run, "ada@example.com")
    with serving(ring, tmp_path / "serve.log") as served, served.client() as http:
        before = token_of(run, "ada@example.com")
        from_api_before = api_token(http, "ada@example.com")
        old_kid = kid_of(before)
        assert kid_of(from_api_before) == old_kid
        assert jwt.get_unverified_header(before)["alg"] == alg

        new_kid = ok(run_usermgr("keys", "rotate", env=ring)).stdout.strip()
        assert new_kid != old_kid
        states = {key["kid"]: key["state"] for key in listed(ring)}
        assert states == {old_kid: "retiring", new_kid: "active"}

        after = token_of(run, "ada@example.com")
        assert kid_of(after) == new_kid
        assert kid_of(api_token(http, "ada@example.com")) == new_kid, "the server sees the rotation at once"
        for token in (before, from_api_before, after):
            assert ok(run_usermgr("verify", token, "-o", "email", env=offline)).stdout == "ada@example.com\n"
            assert ok(run_usermgr("verify", token, "--check-db", "-o", "email", env=ring)).stdout == (
                "ada@example.com\n"
            )
            assert http.get("/users/me", headers=bearer(token)).status_code == 200
        if alg in ASYMMETRIC:
            published = {key["kid"] for key in http.get(api.JWKS_PATH).json()["keys"]}
            assert published == {old_kid, new_kid}

        ok(run_usermgr("keys", "retire", old_kid, env=ring))
        for token in (before, from_api_before):
            line = refused(run_usermgr("verify", token, env=offline), 7)
            assert line == "usermgr: error: token invalid: unknown key"
            line = refused(run_usermgr("verify", token, "--check-db", env=ring), 7)
            assert line == "usermgr: error: token invalid: unknown key"
            answer = http.get("/users/me", headers=bearer(token))
            assert (answer.status_code, answer.json()) == (401, {"detail": "token invalid: unknown key"})
        assert http.get("/users/me", headers=bearer(after)).status_code == 200
        assert ok(run_usermgr("verify", after, "-o", "email", env=offline)).stdout == "ada@example.com\n"
        if alg in ASYMMETRIC:
            assert [key["kid"] for key in http.get(api.JWKS_PATH).json()["keys"]] == [new_kid]


@pytest.mark.e2e
def test_staged_rotation_add_activate_retire(env: dict[str, str], tmp_path: Path) -> None:
    """The timeline for verifiers that fetch JWKS: a next key is published before it signs."""
    ring = ring_env(env, tmp_path, "ES256")
    offline = offline_env(ring, tmp_path)
    run = Runner(ring)
    create_user(run, "ada@example.com")
    first = token_of(run, "ada@example.com")
    added = ok(run_usermgr("keys", "add", "--alg", "RS256", env=ring))
    next_kid = added.stdout.strip()
    assert f"key {next_kid} (RS256): added as next" in added.stderr
    assert kid_of(token_of(run, "ada@example.com")) == kid_of(first), "a next key does not sign"
    exported = json.loads(ok(run_usermgr("keys", "export", env=ring)).stdout)
    assert [key["kid"] for key in exported["keys"]] == [kid_of(first), next_kid]
    ok(run_usermgr("keys", "activate", next_kid, env=ring))
    second = token_of(run, "ada@example.com")
    assert (kid_of(second), jwt.get_unverified_header(second)["alg"]) == (next_kid, "RS256")
    again = ok(run_usermgr("keys", "activate", next_kid, env=ring))
    assert "already the active key" in again.stderr
    # a rollback: the retiring key signs again, the other one becomes retiring
    ok(run_usermgr("keys", "activate", kid_of(first), env=ring))
    assert {key["kid"]: key["state"] for key in listed(ring)} == {kid_of(first): "active", next_kid: "retiring"}
    for token in (first, second):
        ok(run_usermgr("verify", token, env=offline))


# ---- the pre-ring key file ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("alg", ["HS256", "EdDSA"])
def test_a_pre_ring_key_file_becomes_the_first_key_of_the_ring(env: dict[str, str], tmp_path: Path, alg: str) -> None:
    key_file = tmp_path / "old.key"
    tokens.create_key_file(key_file, alg)  # the single-key form every earlier usermgr made
    ring = {**env, "USERMGR_KEY_FILE": str(key_file)}
    offline = offline_env(ring, tmp_path)
    run = Runner(ring)
    create_user(run, "ada@example.com")
    material = key_file.read_bytes()
    signing = material.strip() if alg == "HS256" else material
    kidless = jwt.encode(claims(int(time.time())), signing, algorithm=alg)  # as usermgr signed before the ring
    with_kid = token_of(run, "ada@example.com")

    (only,) = listed(ring)
    assert key_file.read_bytes() == material, "reading never rewrites the file"
    independent = jwcrypto_jwk.JWK.from_pem(material) if alg == "EdDSA" else None
    if independent is None:
        independent = jwcrypto_jwk.JWK(kty="oct", k=keyring._b64url(material.strip()))
    assert only["kid"] == independent.thumbprint() == kid_of(with_kid), "the RFC 7638 thumbprint"
    assert (only["alg"], only["state"]) == (alg, "active")

    new_kid = ok(run_usermgr("keys", "rotate", "--alg", "ES256", env=ring)).stdout.strip()
    stored = json.loads(key_file.read_text())
    assert [key["kid"] for key in stored["keys"]] == [only["kid"], new_kid]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".old.key")) == []
    for token in (kidless, with_kid):
        ok(run_usermgr("verify", token, env=offline))
    ok(run_usermgr("keys", "retire", only["kid"], env=ring))
    for token in (kidless, with_kid):
        assert refused(run_usermgr("verify", token, env=offline), 7).endswith("token invalid: unknown key")


def test_the_secret_key_variable_is_a_one_key_ring_that_keys_cannot_change(tmp_path: Path) -> None:
    secret = "an-application-secret-of-40-bytes-long!!"
    env = {"USERMGR_SECRET_KEY": secret, "USERMGR_DATABASE_URL": str(tmp_path / "absent.db")}
    (only,) = listed(env)
    assert (only["alg"], only["state"]) == ("HS256", "active")
    kidless = jwt.encode(claims(int(time.time())), secret, algorithm="HS256")
    ok(run_usermgr("verify", kidless, env=env))
    line = refused(run_usermgr("keys", "rotate", env=env), 2)
    assert "USERMGR_SECRET_KEY is set" in line
    assert secret not in line


# ---- the `keys` commands' refusals -------------------------------------------------------------------


@pytest.mark.e2e
def test_keys_commands_refuse_clearly(env: dict[str, str], tmp_path: Path) -> None:
    ring = ring_env(env, tmp_path)
    (secret_key,) = listed(ring)
    public_kid = ok(run_usermgr("keys", "add", "--alg", "EdDSA", env=ring)).stdout.strip()
    before = (tmp_path / "ring.key").read_bytes()

    line = refused(run_usermgr("keys", "retire", secret_key["kid"], env=ring), 5)
    assert "is the active key: activate another one first" in line
    for command in ("activate", "retire"):
        line = refused(run_usermgr("keys", command, "no-such-kid", env=ring), 4)
        assert line.startswith("usermgr: error: no key with kid 'no-such-kid'")
    refused(run_usermgr("keys", "export", public_kid, "no-such-kid", env=ring), 4)
    line = refused(run_usermgr("keys", "export", secret_key["kid"], env=ring), 3)
    assert "is HS256: a shared secret has no public form" in line
    refused(run_usermgr("keys", "add", "--alg", "HS512", env=ring), 2)
    assert (tmp_path / "ring.key").read_bytes() == before, "a refusal changes nothing"


@pytest.mark.e2e
def test_a_kid_that_starts_with_a_dash_is_a_kid(env: dict[str, str], tmp_path: Path) -> None:
    """A thumbprint is base64url and may start with `-`: `keys retire "$KID"` must not read it as an option."""
    ring = ring_env(env, tmp_path, "ES256")
    key_file = tmp_path / "ring.key"
    stored = json.loads(key_file.read_text())
    stored["keys"][0]["kid"] = "-Jdash"
    key_file.write_text(json.dumps(stored))
    added = ok(run_usermgr("keys", "add", "--alg", "ES256", env=ring)).stdout.strip()
    ok(run_usermgr("keys", "activate", added, env=ring))
    assert json.loads(ok(run_usermgr("keys", "export", "-Jdash", env=ring)).stdout)["keys"][0]["kid"] == "-Jdash"
    ok(run_usermgr("keys", "activate", "-Jdash", env=ring))
    ok(run_usermgr("keys", "retire", added, env=ring))
    assert [key["kid"] for key in listed(ring)] == ["-Jdash"]


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["jwks", "pem"])
def test_export_and_list_never_show_a_private_key_or_a_secret(env: dict[str, str], tmp_path: Path, fmt: str) -> None:
    ring = ring_env(env, tmp_path)
    for alg in ASYMMETRIC:
        ok(run_usermgr("keys", "add", "--alg", alg, env=ring))
    stored = json.loads((tmp_path / "ring.key").read_text())["keys"]
    secrets_ = [str(key[name]) for key in stored for name in PRIVATE_MEMBERS if name in key]
    assert len(secrets_) >= 1 + 1 + 1 + 6, "the ring holds an HS256 secret and three private keys"
    exported = ok(run_usermgr("keys", "export", "--format", fmt, env=ring)).stdout
    shown = ok(run_usermgr("keys", "list", "-o", "json", env=ring)).stdout
    for text in (exported, shown):
        assert not [value for value in secrets_ if value in text]
    if fmt == "jwks":
        published = json.loads(exported)["keys"]
        assert [key["alg"] for key in published] == ASYMMETRIC
        assert not [key for key in published if set(key) & PRIVATE_MEMBERS]
    else:
        assert exported.count("-----BEGIN PUBLIC KEY-----") == 3
        assert "PRIVATE" not in exported
    fingerprints = [key["fingerprint"] for key in json.loads(shown)]
    assert fingerprints[0] == "" and all(value.startswith("SHA256:") for value in fingerprints[1:])


# ---- a ring file that cannot be trusted ------------------------------------------------------------------


def _two_active(text: str) -> str:
    ring = json.loads(text)
    for key in ring["keys"]:
        key["state"] = "active"
    return json.dumps(ring)


BROKEN_RINGS = {
    "truncated": (lambda text: text[: len(text) // 2], "not JSON"),
    "not-json": (lambda text: "{keys: [}", "not JSON"),
    "two-active-keys": (_two_active, "exactly one active key, this one has 2"),
    "no-keys": (lambda text: '{"keys": []}', 'non-empty "keys" list'),
    "unknown-alg": (lambda text: text.replace('"alg": "HS256"', '"alg": "none"'), "has alg 'none'"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", [*BROKEN_RINGS, "world-readable"])
def test_a_broken_ring_file_is_one_clear_line(env: dict[str, str], tmp_path: Path, case: str) -> None:
    ring = ring_env(env, tmp_path)
    ok(run_usermgr("keys", "add", "--alg", "ES256", env=ring))
    create_user(Runner(ring), "ada@example.com")
    token = token_of(Runner(ring), "ada@example.com")
    key_file = tmp_path / "ring.key"
    if case == "world-readable":
        key_file.chmod(0o644)
        expected = f"is accessible by group or others (mode 0644): run `chmod 600 {key_file}`"
    else:
        damage, expected = BROKEN_RINGS[case]
        key_file.write_text(damage(key_file.read_text()))
    for args in (["verify", token], ["keys", "list"], ["keys", "rotate"], ["keys", "export"]):
        line = refused(run_usermgr(*args, env=ring), 2)
        assert expected in line, (args, line)
    login = run_usermgr("login", "ada@example.com", "--password-stdin", input=f"{PASSWORD}\n", env=ring)
    assert expected in refused(login, 2)


# ---- the server: the JWK Set and its caching -----------------------------------------------------------


@pytest.mark.e2e
def test_jwks_route_is_public_and_cacheable_and_other_routes_are_not(env: dict[str, str], tmp_path: Path) -> None:
    ring = ring_env(env, tmp_path)
    with serving(ring, tmp_path / "serve.log") as served, served.client() as http:
        empty = http.get(api.JWKS_PATH)
        assert (empty.status_code, empty.json()) == (200, {"keys": []}), "HS256 secrets are never published"
        kid = ok(run_usermgr("keys", "add", "--alg", "ES256", env=ring)).stdout.strip()
        answer = http.get(api.JWKS_PATH)
        assert answer.headers["cache-control"] == f"public, max-age={api.JWKS_MAX_AGE}"
        assert answer.headers["x-content-type-options"] == "nosniff", "the other security headers stay"
        assert [key["kid"] for key in answer.json()["keys"]] == [kid]
        assert http.get("/healthz").headers["cache-control"] == "no-store"
        assert http.post(api.JWKS_PATH).headers["cache-control"] == "no-store"


@pytest.mark.e2e
@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_pyjwt_jwks_client_verifies_tokens_against_the_live_jwks(env: dict[str, str], tmp_path: Path, alg: str) -> None:
    ring = ring_env(env, tmp_path, alg)
    run = Runner(ring)
    create_user(run, "ada@example.com")
    with serving(ring, tmp_path / "serve.log") as served, served.client() as http:
        token = api_token(http, "ada@example.com")
        client = jwt.PyJWKClient(served.base_url + api.JWKS_PATH, cache_keys=False)
        key = client.get_signing_key_from_jwt(token)
        assert jwt.decode(token, key, issuer=ISSUER)["email"] == "ada@example.com"
        ok(run_usermgr("keys", "rotate", env=ring))
        rotated = api_token(http, "ada@example.com")
        fresh = jwt.PyJWKClient(served.base_url + api.JWKS_PATH, cache_keys=False)
        assert jwt.decode(rotated, fresh.get_signing_key_from_jwt(rotated), issuer=ISSUER)["sub"]


# ---- interop both ways: jwcrypto and joserfc ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_other_jose_libraries_verify_our_tokens(env: dict[str, str], tmp_path: Path, alg: str) -> None:
    ring = ring_env(env, tmp_path, alg)
    run = Runner(ring)
    create_user(run, "ada@example.com")
    token = token_of(run, "ada@example.com")
    if alg == "HS256":  # a shared secret is never exported: these verifiers hold the ring itself
        ok(run_usermgr("keys", "add", env=ring))  # turns `init`'s single-key file into a ring file
        key_set = {"keys": [{"kty": "oct", "k": key["k"], "kid": key["kid"]} for key in ring_keys(tmp_path)]}
    else:
        key_set = json.loads(ok(run_usermgr("keys", "export", env=ring)).stdout)
    by_jwcrypto = jwcrypto_jwt.JWT(
        jwt=token, key=jwcrypto_jwk.JWKSet.from_json(json.dumps(key_set)), algs=[alg], check_claims={"iss": ISSUER}
    )
    assert json.loads(by_jwcrypto.claims)["email"] == "ada@example.com"
    by_joserfc = joserfc_jwt.decode(token, JoserfcKeySet.import_key_set(key_set), algorithms=[alg])
    assert by_joserfc.claims["email"] == "ada@example.com"
    assert by_joserfc.header["kid"] == kid_of(token)


def ring_keys(tmp_path: Path) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads((tmp_path / "ring.key").read_text())["keys"]
    return keys


@pytest.mark.e2e
@pytest.mark.parametrize("library", ["jwcrypto", "joserfc"])
@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_verify_jwks_accepts_tokens_other_libraries_mint(tmp_path: Path, library: str, alg: str) -> None:
    now = int(time.time())
    if library == "jwcrypto":
        params = {"EdDSA": {"kty": "OKP", "crv": "Ed25519"}, "ES256": {"kty": "EC", "crv": "P-256"}}
        key = jwcrypto_jwk.JWK.generate(**params.get(alg, {"kty": "RSA", "size": 2048}), kid=f"jwcrypto-{alg}")
        minted = jwcrypto_jwt.JWT(header={"alg": alg, "kid": key.key_id}, claims=claims(now))
        minted.make_signed_token(key)
        token, public = minted.serialize(), key.export_public(as_dict=True)
    else:
        from joserfc.jwk import ECKey, OKPKey, RSAKey

        kid = {"kid": f"joserfc-{alg}"}
        made = {
            "EdDSA": lambda: OKPKey.generate_key("Ed25519", parameters=kid),
            "ES256": lambda: ECKey.generate_key("P-256", parameters=kid),
            "RS256": lambda: RSAKey.generate_key(2048, parameters=kid),
        }[alg]()
        token = joserfc_jwt.encode({"alg": alg, "kid": made.kid}, claims(now), made, algorithms=[alg])
        public = made.as_dict(private=False)
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [public]}))
    verifier = {"USERMGR_DATABASE_URL": str(tmp_path / "absent.db"), "USERMGR_KEY_FILE": str(tmp_path / "absent.key")}
    result = ok(run_usermgr("verify", "--jwks", str(jwks_file), token, "-o", "email", env=verifier))
    assert result.stdout == "ada@example.com\n"


# ---- the ring is parsed once per process --------------------------------------------------------------------


def test_the_ring_is_parsed_once_and_again_only_when_the_file_changes(tmp_path: Path) -> None:
    key_file = tmp_path / "ring.key"
    tokens.create_key_file(key_file, "ES256")
    first = keyring.load_ring(key_file, None)
    assert keyring.load_ring(key_file, None) is first
    assert first.key_set is first.key_set
    changes = keyring.change_ring(key_file, None, keyring.add_key("EdDSA"))
    second = keyring.load_ring(key_file, None)
    assert second is not first
    assert [key.kid for key in second.keys] == [first.active.kid, changes[0].kid]
    os.utime(key_file, ns=(0, 0))  # any change of the file's stat reads it again
    assert keyring.load_ring(key_file, None) is not second


def test_a_lookup_by_kid_never_tries_another_key(tmp_path: Path) -> None:
    """A token whose kid names key A but that key B signed is a bad signature, not a match of B."""
    key_file = tmp_path / "ring.key"
    tokens.create_key_file(key_file, "ES256")
    keyring.change_ring(key_file, None, keyring.add_key("ES256"))
    ring = keyring.load_ring(key_file, None)
    first, second = ring.keys
    forged = jwt.encode(claims(int(time.time())), second.signer, algorithm="ES256", headers={"kid": first.kid})
    settings = load_settings(key_file=str(key_file))
    with pytest.raises(TokenInvalid, match="bad signature"):
        tokens.decode_token(forged, settings, ring.key_set)


# ---- every refusal of a ring file, exactly (in process: the mutation run skips e2e tests) -------


def _ring_with(tmp_path: Path, *entries: dict[str, Any]) -> Path:
    """A ring file with one good ES256 key first (the active one), then `entries`."""
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    ring = json.loads(path.read_text())
    ring["keys"].extend(entries)
    path.write_text(json.dumps(ring))
    return path


def _first_key(tmp_path: Path) -> dict[str, Any]:
    tmp_path.mkdir()
    key: dict[str, Any] = json.loads(_ring_with(tmp_path).read_text())["keys"][0]
    return key


RING_REFUSALS: dict[str, tuple[Any, str]] = {
    "cut-short": (
        lambda path: path.write_text('{"keys": ['),
        "{path} is not a valid key ring: not JSON (line 1, column 11), perhaps cut short; restore it from a backup",
    ),
    "no-keys-member": (
        lambda path: path.write_text('{"key": []}'),
        '{path} is not a valid key ring: it needs a non-empty "keys" list',
    ),
    "keys-empty": (
        lambda path: path.write_text('{"keys": []}'),
        '{path} is not a valid key ring: it needs a non-empty "keys" list',
    ),
    "keys-not-a-list": (
        lambda path: path.write_text('{"keys": {"a": 1}}'),
        '{path} is not a valid key ring: it needs a non-empty "keys" list',
    ),
    "key-not-an-object": (lambda path: path.write_text('{"keys": [1]}'), "{path}: key number 1 is not a JSON object"),
}


@pytest.mark.parametrize("case", RING_REFUSALS)
def test_each_unreadable_ring_file_says_why(tmp_path: Path, case: str) -> None:
    path = _ring_with(tmp_path)
    damage, message = RING_REFUSALS[case]
    damage(path)
    with pytest.raises(ConfigurationError) as refused:
        keyring.load_ring(path, None)
    assert str(refused.value) == message.format(path=f"key file {path}")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kid": None}, "key number 2 has no usable kid"),
        ({"kid": ""}, "key number 2 has no usable kid"),
        ({"kid": 7}, "key number 2 has no usable kid"),
        ({"kid": "k" * 257}, "key number 2 has no usable kid"),
        (
            {"kid": "second", "alg": "none"},
            "key 'second' has alg 'none': use one of ('HS256', 'EdDSA', 'ES256', 'RS256')",
        ),
        (
            {"kid": "second", "state": "sleeping"},
            "key 'second' has state 'sleeping': use one of ('next', 'active', 'retiring')",
        ),
        ({"kid": "second", "state": "active"}, "a key ring needs exactly one active key, this one has 2"),
        ({"kid": "SAME"}, "two keys share the kid"),
    ],
    ids=["no-kid", "empty-kid", "kid-not-text", "kid-of-257", "alg-none", "unknown-state", "two-active", "same-kid"],
)
def test_each_unusable_ring_entry_is_named(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    second = {**_first_key(tmp_path / "a"), "state": "next", **change}
    path = _ring_with(tmp_path)
    ring = json.loads(path.read_text())
    if second["kid"] == "SAME":
        second["kid"] = ring["keys"][0]["kid"]
    ring["keys"].append(second)
    path.write_text(json.dumps(ring))
    with pytest.raises(ConfigurationError) as refused:
        keyring.load_ring(path, None)
    assert str(refused.value).startswith(f"key file {path}: {message}"), str(refused.value)


def test_a_kid_of_256_characters_and_a_retired_key_are_taken(tmp_path: Path) -> None:
    first = _first_key(tmp_path / "a")
    long_kid = {**first, "kid": "k" * 256, "state": "retiring"}
    retired = {"kid": "gone", "alg": "ES256", "state": "retired"}  # kept only to say so: no key material needed
    path = _ring_with(tmp_path, long_kid, retired)
    ring = keyring.load_ring(path, None)
    assert [(key.kid, key.state) for key in ring.keys][1:] == [("k" * 256, "retiring")]


def test_a_ring_whose_only_active_key_is_retired_has_none_active(tmp_path: Path) -> None:
    path = _ring_with(tmp_path)
    ring = json.loads(path.read_text())
    ring["keys"][0]["state"] = "retired"
    path.write_text(json.dumps(ring))
    with pytest.raises(ConfigurationError) as refused:
        keyring.load_ring(path, None)
    assert str(refused.value) == f"key file {path}: a key ring needs exactly one active key, this one has 0 (none)"


# ---- the ring's changes, exactly, in process (what the mutation run can see) ----------------------------

ISO_SECOND = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def _states(path: Path) -> list[tuple[str, str, str]]:
    """Each key of the ring file as (kid, alg, state), in the file's order."""
    return [(key["kid"], key["alg"], key["state"]) for key in json.loads(path.read_text())["keys"]]


def test_add_activate_retire_move_each_key_through_its_states_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    old = keyring.load_ring(path, None).active.kid
    source = f"key file {path}"

    added = keyring.change_ring(path, None, keyring.add_key("HS256"))
    new = added[0].kid
    assert added == [keyring.KeyChange("add", new, "HS256")]
    assert _states(path) == [(old, "ES256", "active"), (new, "HS256", "next")]
    stored = json.loads(path.read_text())["keys"][1]
    assert set(stored) == {"kty", "k", "kid", "alg", "use", "state", "created"}
    assert (stored["use"], stored["kid"]) == ("sig", keyring.thumbprint(stored))
    assert re.fullmatch(ISO_SECOND, stored["created"]), stored["created"]
    ring = keyring.load_ring(path, None)
    assert ring.source == source
    assert ring.get(new).record() == {
        "kid": new,
        "alg": "HS256",
        "state": "next",
        "created": stored["created"],
        "fingerprint": "",
    }
    assert ring.get(old).record()["fingerprint"].startswith("SHA256:")

    with pytest.raises(NotFound) as missing:
        keyring.change_ring(path, None, keyring.activate_key("nope"))
    assert str(missing.value) == f"no key with kid 'nope' in {source}: `usermgr keys list` shows them"

    assert keyring.change_ring(path, None, keyring.activate_key(new)) == [
        keyring.KeyChange("activate", new, "HS256"),
        keyring.KeyChange("deactivate", old, "ES256"),
    ]
    assert _states(path) == [(old, "ES256", "retiring"), (new, "HS256", "active")]
    before = path.read_bytes()
    assert keyring.change_ring(path, None, keyring.activate_key(new)) == []  # already active: nothing written
    assert path.read_bytes() == before

    with pytest.raises(Conflict) as active:
        keyring.change_ring(path, None, keyring.retire_key(new))
    assert str(active.value) == (
        f"key {new!r} is the active key: activate another one first"
        " (`usermgr keys rotate`, or `usermgr keys activate KID`)"
    )
    assert path.read_bytes() == before
    with pytest.raises(NotFound) as missing:
        keyring.change_ring(path, None, keyring.retire_key("gone"))
    assert str(missing.value) == f"no key with kid 'gone' in {source}: `usermgr keys list` shows them"

    assert keyring.change_ring(path, None, keyring.retire_key(old)) == [keyring.KeyChange("retire", old, "ES256")]
    assert _states(path) == [(new, "HS256", "active")]

    rotated = keyring.change_ring(path, None, keyring.rotate_key("EdDSA"))
    newest = rotated[0].kid
    assert rotated == [
        keyring.KeyChange("add", newest, "EdDSA"),
        keyring.KeyChange("activate", newest, "EdDSA"),
        keyring.KeyChange("deactivate", new, "HS256"),
    ]
    assert _states(path) == [(new, "HS256", "retiring"), (newest, "EdDSA", "active")]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_next_key_stays_next_until_activated_and_a_retiring_one_can_sign_again(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "HS256")
    first = keyring.load_ring(path, None).active.kid
    second = keyring.change_ring(path, None, keyring.add_key("HS256"))[0].kid
    third = keyring.change_ring(path, None, keyring.add_key("HS256", "next"))[0].kid
    keyring.change_ring(path, None, keyring.activate_key(second))
    assert _states(path) == [(first, "HS256", "retiring"), (second, "HS256", "active"), (third, "HS256", "next")]
    keyring.change_ring(path, None, keyring.activate_key(first))
    assert _states(path) == [(first, "HS256", "active"), (second, "HS256", "retiring"), (third, "HS256", "next")]
    assert keyring.change_ring(path, None, keyring.retire_key(third)) == [keyring.KeyChange("retire", third, "HS256")]
    assert keyring.load_ring(path, None).get(first).pre_ring  # the pre-ring key stays marked so
    assert json.loads(path.read_text())["keys"][0]["pre_ring"] is True
    assert "pre_ring" not in json.loads(path.read_text())["keys"][1]


def test_the_settings_that_keys_cannot_change_are_refused_exactly(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as fixed:
        keyring.change_ring(tmp_path / "ring.key", "s" * 40, keyring.add_key("HS256"))
    assert str(fixed.value) == (
        "USERMGR_SECRET_KEY is set: it is a fixed one-key ring that `keys` cannot change;"
        " unset it to manage the key file"
    )
    with pytest.raises(ConfigurationError) as none:
        keyring.change_ring(None, None, keyring.add_key("HS256"))
    assert str(none.value) == "no key file: give --key-file (USERMGR_KEY_FILE)"
    with pytest.raises(ConfigurationError) as unset:
        keyring.load_ring(None, None)
    assert str(unset.value) == "no signing key: set USERMGR_SECRET_KEY, or give --key-file (USERMGR_KEY_FILE)"
    ring = keyring.load_ring(None, "s" * 40)
    assert ring.source == "USERMGR_SECRET_KEY"
    assert keyring.load_ring(None, "s" * 40) is ring
    with pytest.raises(NotFound) as missing:
        ring.get("x")
    assert str(missing.value) == "no key with kid 'x' in USERMGR_SECRET_KEY: `usermgr keys list` shows them"
    with pytest.raises(InvalidInput) as unknown:
        keyring.new_jwk("HS512")
    assert str(unknown.value) == "unknown algorithm 'HS512': use one of HS256, EdDSA, ES256, RS256"


def _segment(header: Any) -> str:
    return keyring._b64url(json.dumps(header).encode())


def test_a_token_is_checked_only_against_the_key_its_kid_names(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    keyring.change_ring(path, None, keyring.add_key("EdDSA"))
    ring = keyring.load_ring(path, None)
    first, second = ring.keys
    keys = ring.key_set
    for key in (first, second):
        token = jwt.encode(claims(int(time.time())), key.signer, algorithm=key.alg, headers={"kid": key.kid})
        chosen = keys.for_token(token)
        assert (chosen.kid, chosen.alg) == (key.kid, key.alg)
        assert keys.for_token(token) is chosen  # the second lookup of a header gives the same key
    refusals = {
        _segment({"alg": "ES256"}) + ".e30.x": "token invalid: unknown key",  # no kid: no pre-ring key here
        _segment({"alg": "ES256", "kid": "other"}) + ".e30.x": "token invalid: unknown key",
        _segment({"alg": "ES256", "kid": 7}) + ".e30.x": "token invalid: malformed",
        _segment(["kid"]) + ".e30.x": "token invalid: malformed",
        "!!!.e30.x": "token invalid: malformed",
        keyring._b64url(b"{not json") + ".e30.x": "token invalid: malformed",
    }
    for token, message in refusals.items():
        with pytest.raises(TokenInvalid) as refused:
            keys.for_token(token)
        assert str(refused.value) == message, token
    shared = keyring.KeySet({}, None, frozenset({"twin"}))
    with pytest.raises(TokenInvalid) as ambiguous:
        shared.for_token(_segment({"alg": "ES256", "kid": "twin"}) + ".e30.x")
    assert str(ambiguous.value) == "token invalid: ambiguous key (several keys of the JWK Set share its kid)"


def test_a_kidless_token_verifies_only_against_the_pre_ring_key(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "HS256")
    pre_ring = keyring.load_ring(path, None).active
    kidless = jwt.encode(claims(int(time.time())), pre_ring.signer, algorithm="HS256")
    assert keyring.load_ring(path, None).key_set.for_token(kidless).kid == pre_ring.kid
    keyring.change_ring(path, None, keyring.rotate_key("HS256"))
    assert keyring.load_ring(path, None).key_set.for_token(kidless).kid == pre_ring.kid  # still in the ring
    keyring.change_ring(path, None, keyring.retire_key(pre_ring.kid))
    with pytest.raises(TokenInvalid) as refused:
        keyring.load_ring(path, None).key_set.for_token(kidless)
    assert str(refused.value) == "token invalid: unknown key"


def test_the_public_jwks_holds_the_public_half_of_each_asymmetric_key_only(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    for alg in ("HS256", "EdDSA", "RS256"):
        keyring.change_ring(path, None, keyring.add_key(alg))
    ring = keyring.load_ring(path, None)
    published = keyring.public_jwks(ring)
    assert [(key["kid"], key["alg"], key["use"]) for key in published["keys"]] == [
        (key.kid, key.alg, "sig") for key in ring.keys if key.alg != "HS256"
    ]
    assert [sorted(key) for key in published["keys"]] == [
        ["alg", "crv", "kid", "kty", "use", "x", "y"],
        ["alg", "crv", "kid", "kty", "use", "x"],
        ["alg", "e", "kid", "kty", "n", "use"],
    ]
    assert not any(PRIVATE_MEMBERS & set(key) for key in published["keys"])
    for key in published["keys"]:
        assert key["kid"] == keyring.thumbprint(key)
    secret = ring.keys[1]
    with pytest.raises(InvalidInput) as refused:
        secret.public_pem()
    assert str(refused.value) == (
        f"key {secret.kid!r} is HS256: a shared secret has no public form; give verifiers the key ring file instead"
    )
    assert ring.keys[2].public_pem().startswith("-----BEGIN PUBLIC KEY-----\n")


def test_a_kid_is_shown_quoted_and_cut_at_60_characters() -> None:
    assert keyring.shown_kid("k" * 60) == repr("k" * 60)
    assert keyring.shown_kid("k" * 61) == repr("k" * 60 + "...")
    assert keyring.shown_kid(None) == "'None'"
    assert re.fullmatch(ISO_SECOND, keyring.utc_now())


def test_a_pre_ring_key_keeps_its_file_time_as_created_when_the_ring_is_first_written(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "HS256")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    keyring.change_ring(path, None, keyring.add_key("HS256"))
    assert json.loads(path.read_text())["keys"][0]["created"] == "2023-11-14T22:13:20Z"


def test_a_new_key_is_dated_in_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC-12")
    time.tzset()
    try:
        stamp = time.mktime(time.strptime(keyring.utc_now(), "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    finally:
        monkeypatch.undo()
        time.tzset()
    assert abs(stamp - time.time()) < 3600  # twelve hours off if the local time were taken


def _rsa_jwk(bits: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(private, as_dict=True)
    return jwk


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (lambda es256: {**es256, "alg": "EdDSA"}, "{source}: key 'second' is not a EdDSA key"),
        (lambda es256: {**es256, "alg": "HS256"}, "{source}: key 'second' is not a HS256 key"),
        (lambda es256: {**es256, "alg": "RS256"}, "{source}: key 'second' is not a RS256 key"),
        (lambda es256: {**es256, "crv": "P-384"}, "{source}: key 'second' is not a ES256 key"),
        (lambda es256: {**es256, "x": "AAAA"}, "key 'second' is not a valid ES256 key"),
        (
            lambda es256: {"kty": "oct", "k": keyring._b64url(b"s" * 31), "alg": "HS256"},
            "the HS256 secret is shorter than 32 bytes: use a longer one",
        ),
        (
            lambda es256: {**_rsa_jwk(1024), "alg": "RS256"},
            "{source}: key 'second' is a 1024-bit RSA key: RS256 needs 2048 bits or more",
        ),
    ],
    ids=["ec-as-eddsa", "ec-as-hs256", "ec-as-rs256", "wrong-curve", "bad-point", "short-secret", "rsa-1024"],
)
def test_each_key_must_be_the_kind_and_size_its_alg_needs(tmp_path: Path, entry: Any, message: str) -> None:
    second = {**entry(_first_key(tmp_path / "a")), "kid": "second", "state": "next"}
    path = _ring_with(tmp_path, second)
    with pytest.raises(ConfigurationError) as refused:
        keyring.load_ring(path, None)
    assert str(refused.value) == message.format(source=f"key file {path}")


def test_the_smallest_keys_each_alg_takes_are_taken(tmp_path: Path) -> None:
    secret = {"kty": "oct", "k": keyring._b64url(b"s" * 32), "alg": "HS256", "kid": "secret", "state": "next"}
    rsa = {**_rsa_jwk(2048), "alg": "RS256", "kid": "rsa", "state": "retiring"}
    ring = keyring.load_ring(_ring_with(tmp_path, secret, rsa), None)
    assert [(key.kid, key.alg, key.state) for key in ring.keys][1:] == [
        ("secret", "HS256", "next"),
        ("rsa", "RS256", "retiring"),
    ]
    assert [sorted(key) for key in keyring.public_jwks(ring)["keys"]][1] == ["alg", "e", "kid", "kty", "n", "use"]


def test_a_pre_ring_secret_or_pem_is_a_one_key_ring_named_by_its_source(tmp_path: Path) -> None:
    secret = "s" * 40
    ring = keyring.load_ring(None, secret)
    [key] = ring.keys
    expected_kid = keyring.thumbprint({"kty": "oct", "k": keyring._b64url(secret.encode())})
    assert (ring.source, key.kid, key.alg, key.state, key.created, key.pre_ring) == (
        "USERMGR_SECRET_KEY",
        expected_kid,
        "HS256",
        "active",
        "",
        True,
    )
    assert key.stored()["kid"] == expected_kid and key.jwk["kid"] == expected_kid
    path = tmp_path / "ed.key"
    assert tokens.create_key_file(path, "EdDSA")
    os.utime(path, (1_700_000_000, 1_700_000_000))
    ring = keyring.load_ring(path, None)
    assert (ring.source, ring.active.alg, ring.active.created, ring.active.pre_ring) == (
        f"key file {path}",
        "EdDSA",
        "2023-11-14T22:13:20Z",
        True,
    )
    assert ring.active.kid == keyring.thumbprint(ring.active.jwk)


def test_a_ring_entry_keeps_its_created_text_and_a_retired_key_skips_only_itself(tmp_path: Path) -> None:
    first = _first_key(tmp_path / "a")
    undated = {key: value for key, value in first.items() if key != "created"} | {"kid": "undated", "state": "next"}
    odd = {**first, "kid": "odd", "state": "next", "created": 7}
    path = _ring_with(tmp_path, {"kid": "gone", "alg": "ES256", "state": "retired"}, undated, odd)
    ring = keyring.load_ring(path, None)
    assert [(key.kid, key.created) for key in ring.keys][1:] == [("undated", ""), ("odd", "")]


def _private_pem(kind: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    private: Any = {
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }[kind]()
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_a_pre_ring_private_pem_of_each_kind_becomes_a_key_of_its_alg_that_signs(alg: str) -> None:
    """A PEM key file from before the ring (any kind usermgr signs with) is read in process as
    a one-key ring: its private JWK whole, its alg named exactly, and a token it signs verifies."""
    ring = keyring.parse_ring(_private_pem(alg), "key file k.pem")
    [key] = ring.keys
    assert (key.alg, key.jwk["kty"], key.pre_ring) == (alg, {"EdDSA": "OKP", "ES256": "EC", "RS256": "RSA"}[alg], True)
    assert "d" in key.jwk and key.kid == keyring.thumbprint(key.jwk)
    token = jwt.encode({"sub": "1"}, key.signer.key, algorithm=alg, headers={"kid": key.kid})
    assert jwt.decode(token, key.verifier.key, algorithms=[alg])["sub"] == "1"


def test_the_ring_file_is_written_indented_for_the_admin_who_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "ring.key"
    assert tokens.create_key_file(path, "ES256")
    text = path.read_text()
    assert text.startswith('{\n  "keys": [\n    {\n      "')
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_inits_racing_for_one_key_file_leave_exactly_one_key_and_its_maker_alone_says_so(
    tmp_path: Path, alg: str
) -> None:
    """Every racer passes the "exists?" check before any writes; only one may then create the
    file and report it, and the file is that one racer's key, never overwritten by another."""
    import threading

    path = tmp_path / "ring.key"
    start = threading.Barrier(8)
    made: list[bool] = []

    def racer() -> None:
        start.wait()
        made.append(tokens.create_key_file(path, alg))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == [False] * 7 + [True]
    assert keyring.load_ring(path, None).active.alg == alg
