"""Customer bearer tokens: a local minting command (verification is shared/auth.py).

    python -m services.rewards.token CUSTOMER_ID [--ttl-s 3600]

prints a token for CUSTOMER_ID signed with the local key (REWARDS_JWT_SECRET, HS256), with
REWARDS_JWT_ISSUER and REWARDS_JWT_AUDIENCE. In production the retailer's identity provider
issues the tokens and the services only verify them.
"""

import argparse
import sys

from shared.auth import REQUIRED_CLAIMS, InvalidToken, TokenVerifier, mint_token

__all__ = ["REQUIRED_CLAIMS", "InvalidToken", "TokenVerifier", "mint_token", "main"]


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
