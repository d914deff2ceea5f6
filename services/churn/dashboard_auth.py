"""Who may see the reports: the admin key in the X-Admin-Key header, or a dashboard session
(an HttpOnly cookie the login form sets, signed with the admin key: changing the key ends
every session). No key configured: the reports answer 503, like the admin API."""

import hashlib
import hmac
import time
from collections.abc import Callable

from fastapi import HTTPException, Request
from pydantic import SecretStr

from shared.admin import ADMIN_REFUSALS, AdminKeyRefused, check_admin_key

COOKIE = "churn_dashboard_session"
SESSION_TTL_S = 8 * 3600


def _secret(key: str | SecretStr | None) -> str | None:
    return key.get_secret_value() if isinstance(key, SecretStr) else key


def _signature(key: str, expires: int) -> str:
    return hmac.new(key.encode(), f"churn-dashboard-session:{expires}".encode(), hashlib.sha256).hexdigest()


def session_value(key: str | SecretStr, *, now: float | None = None, ttl_s: int = SESSION_TTL_S) -> str:
    expires = int((now if now is not None else time.time()) + ttl_s)
    return f"{expires}.{_signature(_secret(key), expires)}"


def session_valid(value: str | None, key: str | SecretStr | None, *, now: float | None = None) -> bool:
    key = _secret(key)
    if not key or not value or "." not in value:
        return False
    expires_text, signature = value.split(".", 1)
    if not expires_text.isdigit() or int(expires_text) < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(signature, _signature(key, int(expires_text)))


def authorise(request: Request, key: str | SecretStr | None) -> AdminKeyRefused | None:
    """None when the request may see the reports, else why not."""
    if _secret(key) and session_valid(request.cookies.get(COOKIE), key):
        return None
    try:
        check_admin_key(request.headers.get("x-admin-key"), key, setting="CHURN_ADMIN_API_KEY")
    except AdminKeyRefused as refused:
        return refused
    return None


def reports_dependency(key: Callable[[], str | SecretStr | None]):
    """A FastAPI dependency for the JSON reports: 401/503 with a useful body."""

    async def require(request: Request) -> None:
        refused = authorise(request, key())
        if refused is not None:
            ADMIN_REFUSALS.labels(refused.reason).inc()
            raise HTTPException(refused.status, detail={"error": refused.reason, "detail": refused.msg})

    return require
