"""Customer bearer tokens (JWT) issued by the retailer's identity provider: the settings a
customer-facing service verifies them with, the verifier, and minting for local use.

The rewards API acts for the token's subject; the ledger's customer reads accept a token
only for the customer it names. Both verify the same tokens: same issuer, audience and key.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import jwt
from pydantic import BaseModel, Field, SecretStr

# The only algorithms a customer token may be signed with. 'none' is never among them, and
# one deployment accepts exactly one of them, so an RS256 public key can never be misused
# as an HS256 secret (the classic key-confusion attack).
JwtAlgorithm = Literal["HS256", "RS256"]


class CustomerTokenSettings(BaseModel):
    """Mixed into a service's settings (its env prefix applies: REWARDS_JWT_SECRET, ...)."""

    jwt_issuer: str = "loyalty-local"
    jwt_audience: str = "loyalty-rewards"
    jwt_algorithm: JwtAlgorithm = "HS256"
    jwt_secret: SecretStr | None = None
    # PEM text of the RS256 public key, or a path to it.
    jwt_public_key: str | None = None
    jwt_public_key_file: str | None = None
    # Clock skew tolerated between the identity provider and us.
    jwt_leeway_s: int = Field(default=30, ge=0, le=300)
    # The longest lifetime a token may claim (exp - iat, and exp - now): a token minted for a
    # hundred years is a password that never changes, and is refused.
    jwt_max_lifetime_s: int = Field(default=86_400, gt=0)

    def _env(self, name: str) -> str:
        return f"{self.model_config.get('env_prefix', '')}{name}"

    def jwt_public_key_or_none(self) -> str | None:
        if self.jwt_public_key:
            return self.jwt_public_key
        if self.jwt_public_key_file:
            with open(self.jwt_public_key_file) as f:
                return f.read()
        return None

    def jwt_configured(self) -> bool:
        if self.jwt_algorithm == "HS256":
            return self.jwt_secret is not None
        return bool(self.jwt_public_key or self.jwt_public_key_file)

    def jwt_verification_key(self) -> str:
        """The key customer tokens are verified with; ValueError when there is none usable."""
        if self.jwt_algorithm == "HS256":
            if self.jwt_secret is None or len(self.jwt_secret.get_secret_value()) < 32:
                raise ValueError(f"{self._env('JWT_SECRET')} must be set (at least 32 characters) for HS256")
            return self.jwt_secret.get_secret_value()
        key = self.jwt_public_key_or_none()
        if not key:
            raise ValueError(f"{self._env('JWT_PUBLIC_KEY')} or {self._env('JWT_PUBLIC_KEY_FILE')} must be set for RS256")
        return key

    def token_verifier(self) -> "TokenVerifier":
        return TokenVerifier(key=self.jwt_verification_key(), algorithm=self.jwt_algorithm, issuer=self.jwt_issuer,
                             audience=self.jwt_audience, leeway_s=self.jwt_leeway_s,
                             max_lifetime_s=self.jwt_max_lifetime_s)


# Every token must carry these; a token without an expiry is never accepted.
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]


class InvalidToken(Exception):
    """The token cannot be trusted; `reason` is safe to show to the client, `code` is one of a
    few fixed words (a metric label)."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason, self.code = reason, code


@dataclass
class TokenVerifier:
    key: str = field(repr=False)
    algorithm: str
    issuer: str
    audience: str
    leeway_s: int = 30
    max_lifetime_s: int = 86_400
    clock: Callable[[], float] = time.time
    # A client sends the same token with every request: a token verified once is remembered
    # (by its exact bytes) until it expires, instead of re-checking its signature each time
    # (a tenth of the CPU of a redemption). Expiry is checked again on every use.
    cache_size: int = 10_000
    _verified: dict[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # An allow-list of exactly one asymmetric or symmetric algorithm: 'none' and
        # algorithm switching (RS256 key used as an HS256 secret) are impossible.
        if self.algorithm not in ("HS256", "RS256"):
            raise ValueError(f"unsupported JWT algorithm {self.algorithm!r}")

    def customer_id(self, token: str) -> str:
        """The customer the token speaks for (its subject), or InvalidToken."""
        known = self._verified.get(token)
        if known is not None:
            subject, expires_at = known
            if self.clock() < expires_at + self.leeway_s:
                return subject
            del self._verified[token]
            raise InvalidToken("token expired", "expired")
        subject, expires_at = self._verify(token)
        if len(self._verified) >= self.cache_size:
            self._verified.clear()  # crude but bounded; the next requests re-verify
        self._verified[token] = (subject, expires_at)
        return subject

    def _verify(self, token: str) -> tuple[str, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("malformed token", "malformed") from None
        if header.get("alg") != self.algorithm:
            raise InvalidToken("token algorithm not accepted", "algorithm_not_accepted")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired", "expired") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature invalid", "signature_invalid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token audience not accepted", "audience_not_accepted") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token issuer not accepted", "issuer_not_accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token lacks the {exc.claim!r} claim", "missing_claim") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("token invalid", "invalid") from None
        exp, iat = claims["exp"], claims["iat"]
        if not _is_number(exp) or not _is_number(iat):
            # PyJWT would read "exp": "4102444800" as a number: the claims are NumericDate.
            raise InvalidToken("token exp and iat must be numbers (NumericDate)", "invalid_time_claim")
        if exp - iat > self.max_lifetime_s or exp - self.clock() > self.max_lifetime_s + self.leeway_s:
            raise InvalidToken(f"token lifetime exceeds {self.max_lifetime_s} s", "lifetime_too_long")
        subject = claims.get("sub")
        if (not isinstance(subject, str) or not subject.strip() or len(subject) > 128
                or any(ord(c) < 32 or ord(c) == 127 for c in subject)):
            raise InvalidToken("token subject invalid", "subject_invalid")
        return subject, float(claims["exp"])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mint_token(
    customer_id: str, *, key: str, issuer: str, audience: str, ttl_s: int = 3600, algorithm: str = "HS256",
    now_s: int | None = None,
) -> str:
    now_s = int(time.time()) if now_s is None else now_s
    claims = {"sub": customer_id, "iss": issuer, "aud": audience, "iat": now_s, "exp": now_s + ttl_s}
    return jwt.encode(claims, key, algorithm=algorithm)


