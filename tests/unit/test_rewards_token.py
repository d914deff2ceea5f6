"""Customer token verification: only a well-signed, current token for our issuer and
audience names a customer; 'none', tampering, expiry and algorithm switching are refused."""

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.rewards.token import InvalidToken, TokenVerifier, main, mint_token

SECRET = "s" * 40
ISS, AUD = "idp.example", "loyalty-rewards"


def verifier(**changes) -> TokenVerifier:
    args = {"key": SECRET, "algorithm": "HS256", "issuer": ISS, "audience": AUD, "leeway_s": 5} | changes
    return TokenVerifier(**args)


def token(customer_id: str = "cust-1", **changes) -> str:
    args = {"key": SECRET, "issuer": ISS, "audience": AUD} | changes
    return mint_token(customer_id, **args)


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def refused(tok: str, v: TokenVerifier | None = None) -> str:
    with pytest.raises(InvalidToken) as exc:
        (v or verifier()).customer_id(tok)
    return exc.value.reason


def test_a_valid_token_names_its_subject():
    assert verifier().customer_id(token("cust-42")) == "cust-42"


def test_an_expired_token_is_refused():
    assert refused(token(now_s=int(time.time()) - 7200, ttl_s=3600)) == "token expired"


def test_a_token_expired_within_the_leeway_is_still_accepted():
    assert verifier().customer_id(token(now_s=int(time.time()) - 62, ttl_s=60)) == "cust-1"


def test_a_tampered_payload_is_refused():
    header, _payload, signature = token("cust-1").split(".")
    forged = b64({"sub": "cust-2", "iss": ISS, "aud": AUD, "iat": int(time.time()), "exp": int(time.time()) + 60})
    assert refused(f"{header}.{forged}.{signature}") == "token signature invalid"


def test_a_token_signed_with_another_secret_is_refused():
    assert refused(token(key="x" * 40)) == "token signature invalid"


def test_an_alg_none_token_is_refused():
    now = int(time.time())
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'cust-1', 'iss': ISS, 'aud': AUD, 'iat': now, 'exp': now + 60})}."
    assert refused(unsigned) == "token algorithm not accepted"


def test_an_alg_none_token_is_refused_even_with_a_signature_part():
    now = int(time.time())
    unsigned = f"{b64({'alg': 'none'})}.{b64({'sub': 'c', 'iss': ISS, 'aud': AUD, 'iat': now, 'exp': now + 60})}.abc"
    assert refused(unsigned) == "token algorithm not accepted"


def test_another_issuer_or_audience_is_refused():
    assert refused(token(issuer="evil")) == "token issuer not accepted"
    assert refused(token(audience="another-app")) == "token audience not accepted"


def test_a_token_without_expiry_is_refused():
    tok = jwt.encode({"sub": "cust-1", "iss": ISS, "aud": AUD, "iat": int(time.time())}, SECRET, algorithm="HS256")
    assert refused(tok) == "token lacks the 'exp' claim"


def test_a_token_without_subject_is_refused():
    now = int(time.time())
    tok = jwt.encode({"iss": ISS, "aud": AUD, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
    assert refused(tok) == "token lacks the 'sub' claim"


def test_garbage_is_refused():
    assert refused("not.a.token") == "malformed token"
    assert refused("") == "malformed token"


def test_the_algorithm_allow_list_excludes_none_and_others():
    for algorithm in ("none", "HS512", "ES256"):
        with pytest.raises(ValueError):
            verifier(algorithm=algorithm)


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def test_rs256_tokens_verify_with_the_public_key(rsa_keys):
    private, public = rsa_keys
    v = verifier(key=public, algorithm="RS256")
    assert v.customer_id(token("cust-rs", key=private, algorithm="RS256")) == "cust-rs"


def test_an_hs256_token_signed_with_the_rs256_public_key_is_refused(rsa_keys):
    # Key confusion: the public key is public, so an HS256 token "signed" with it proves nothing.
    _private, public = rsa_keys
    now = int(time.time())
    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64({"sub": "cust-1", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 60})
    import hashlib
    import hmac

    sig = base64.urlsafe_b64encode(
        hmac.new(public.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    ).rstrip(b"=").decode()
    assert refused(f"{header}.{payload}.{sig}", verifier(key=public, algorithm="RS256")) == (
        "token algorithm not accepted"
    )


def test_the_token_command_mints_a_token_the_service_accepts(monkeypatch, capsys):
    monkeypatch.setenv("REWARDS_JWT_SECRET", SECRET)
    monkeypatch.setenv("REWARDS_JWT_ISSUER", ISS)
    monkeypatch.setenv("REWARDS_JWT_AUDIENCE", AUD)
    assert main(["cust-cli", "--ttl-s", "120"]) == 0
    printed = capsys.readouterr().out.strip()
    assert verifier().customer_id(printed) == "cust-cli"


def test_the_token_command_refuses_without_a_secret(monkeypatch, capsys):
    monkeypatch.delenv("REWARDS_JWT_SECRET", raising=False)
    assert main(["cust-cli"]) == 2
    assert "REWARDS_JWT_SECRET" in capsys.readouterr().err


def test_a_remembered_token_still_expires():
    v = verifier()
    tok = token("cust-1", ttl_s=60)
    assert v.customer_id(tok) == "cust-1"
    assert v.customer_id(tok) == "cust-1"  # from the cache
    v.clock = lambda: time.time() + 3600
    assert refused(tok, v) == "token expired"


def test_a_refused_token_is_not_remembered_as_valid():
    v = verifier()
    header, _payload, signature = token("cust-1").split(".")
    forged = f"{header}.{b64({'sub': 'cust-2', 'iss': ISS, 'aud': AUD, 'exp': int(time.time()) + 60})}.{signature}"
    for _ in range(2):
        assert refused(forged, v) == "token signature invalid"


def test_a_token_claiming_a_hundred_years_is_refused():
    assert refused(token(ttl_s=100 * 365 * 86_400)) == "token lifetime exceeds 86400 s"


def test_a_token_within_the_configured_lifetime_is_accepted_and_a_longer_one_refused():
    v = verifier(max_lifetime_s=600)
    assert v.customer_id(token(ttl_s=600)) == "cust-1"
    assert refused(token(ttl_s=601), v) == "token lifetime exceeds 600 s"


@pytest.mark.parametrize("claim", ["exp", "iat"])
def test_a_time_claim_given_as_a_string_is_refused(claim):
    now = int(time.time())
    claims = {"sub": "cust-1", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 60}
    claims[claim] = str(claims[claim])
    assert refused(jwt.encode(claims, SECRET, algorithm="HS256")) == "token exp and iat must be numbers (NumericDate)"
