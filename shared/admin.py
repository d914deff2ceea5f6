"""The one admin-key check of every service's back-office API (header `X-Admin-Key`).

Unset key: the admin API answers 503 (never open by default); a missing or wrong key: 401.
The comparison takes constant time. Each service keeps its own error body shape by passing
`refusal` (an AdminKeyRefused -> the exception its handlers turn into a response)."""

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Header, HTTPException
from prometheus_client import Counter
from pydantic import SecretStr

ADMIN_REFUSALS = Counter("http_admin_refusals_total", "Admin API requests refused, by reason", ["reason"])


class AdminKeyRefused(Exception):
    def __init__(self, status: int, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.status, self.reason, self.msg = status, reason, msg


def check_admin_key(given: str | None, expected: str | SecretStr | None, *, setting: str) -> None:
    """Raise AdminKeyRefused unless `given` is the configured key (`setting` names its variable)."""
    if isinstance(expected, SecretStr):
        expected = expected.get_secret_value()
    if not expected:
        raise AdminKeyRefused(503, "admin_api_disabled", f"the admin API is disabled: {setting} is not set")
    if given is None:
        raise AdminKeyRefused(401, "missing_admin_key", "an X-Admin-Key header is required")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AdminKeyRefused(401, "invalid_admin_key", "the X-Admin-Key header is wrong")


def _http_exception(refused: AdminKeyRefused) -> Exception:
    return HTTPException(refused.status, detail={"reason": refused.reason, "msg": refused.msg})


def admin_key_dependency(expected: Callable[[], str | SecretStr | None], *, setting: str,
                         refusal: Callable[[AdminKeyRefused], Exception] = _http_exception) -> Callable[..., object]:
    """A FastAPI dependency requiring the admin key; refusals are counted by reason."""

    async def require_admin_key(x_admin_key: Annotated[str | None, Header()] = None) -> None:
        try:
            check_admin_key(x_admin_key, expected(), setting=setting)
        except AdminKeyRefused as refused:
            ADMIN_REFUSALS.labels(refused.reason).inc()
            raise refusal(refused) from None

    return require_admin_key
