"""Signed links: unsubscribe (no expiry: a link in an old message must still work), survey
and complaint (expiring). HMAC-SHA256 over a compact JSON claim, base64url; nothing
personal in clear beyond the customer id the link acts for."""

import base64
import hashlib
import hmac
import json
from datetime import datetime


class BadToken(Exception):
    """A link that was not signed by us, was altered, or has expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: str, purpose: str, claims: dict, *, expires_at: datetime | None = None) -> str:
    body = {"p": purpose, **claims}
    if expires_at is not None:
        body["exp"] = int(expires_at.timestamp())
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(secret.encode(), raw, hashlib.sha256).digest()[:18]
    return f"{_b64(raw)}.{_b64(mac)}"


def verify(secret: str, purpose: str, token: str, *, now: datetime) -> dict:
    try:
        raw_part, mac_part = token.split(".", 1)
        raw, mac = _unb64(raw_part), _unb64(mac_part)
    except (ValueError, TypeError):
        raise BadToken("malformed") from None
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).digest()[:18]
    if not hmac.compare_digest(mac, expected):
        raise BadToken("bad_signature")
    try:
        claims = json.loads(raw)
    except ValueError:
        raise BadToken("malformed") from None
    if not isinstance(claims, dict) or claims.get("p") != purpose:
        raise BadToken("wrong_purpose")
    if "exp" in claims and now.timestamp() > claims["exp"]:
        raise BadToken("expired")
    return claims
