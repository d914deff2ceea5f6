"""Customer bearer tokens: verification (used by the API) and a local minting command.

    python -m services.rewards.token CUSTOMER_ID [--ttl-s 3600]

prints a token for CUSTOMER_ID signed with the local key (REWARDS_JWT_SECRET, HS256), with
REWARDS_JWT_ISSUER and REWARDS_JWT_AUDIENCE. In production the retailer's identity provider
issues the tokens and this service only verifies them.
"""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt

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
    key: str
    algorithm: str
    issuer: str
    audience: str
    leeway_s: int = 30
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
        subject = claims.get("sub")
        if (not isinstance(subject, str) or not subject.strip() or len(subject) > 128
                or any(ord(c) < 32 or ord(c) == 127 for c in subject)):
            raise InvalidToken("token subject invalid", "subject_invalid")
        return subject, float(claims["exp"])


def mint_token(
    customer_id: str, *, key: str, issuer: str, audience: str, ttl_s: int = 3600, algorithm: str = "HS256",
    now_s: int | None = None,
) -> str:
    now_s = int(time.time()) if now_s is None else now_s
    claims = {"sub": customer_id, "iss": issuer, "aud": audience, "iat": now_s, "exp": now_s + ttl_s}
    return jwt.encode(claims, key, algorithm=algorithm)


def main(argv: list[str] | None = None) -> int:
    from services.rewards.settings import RewardsSettings

    parser = argparse.ArgumentParser(prog="python -m services.rewards.token", description=__doc__.split("\n\n")[0])
    parser.add_argument("customer_id")
    parser.add_argument("--ttl-s", type=int, default=3600, help="lifetime of the token in seconds")
    parser.add_argument("--private-key-file", help="RS256 private key (PEM) when REWARDS_JWT_ALGORITHM=RS256")
    args = parser.parse_args(argv)
    settings = RewardsSettings()
    if settings.jwt_algorithm == "RS256":
        if not args.private_key_file:
            print("RS256: pass --private-key-file (the identity provider's key)", file=sys.stderr)
            return 2
        with open(args.private_key_file) as f:
            key = f.read()
    else:
        try:
            key = settings.jwt_verification_key()
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    print(mint_token(args.customer_id, key=key, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                     ttl_s=args.ttl_s, algorithm=settings.jwt_algorithm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
