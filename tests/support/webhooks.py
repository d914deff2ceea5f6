"""Sign webhook bodies the way Shopify and WooCommerce do, for tests that call the
purchases service's webhook endpoints."""

import base64
import hashlib
import hmac


def _base64_hmac_sha256(secret: str, body: bytes | str) -> str:
    raw = body.encode() if isinstance(body, str) else body
    return base64.b64encode(hmac.new(secret.encode(), raw, hashlib.sha256).digest()).decode()


def sign_shopify(secret: str, body: bytes | str) -> str:
    """The X-Shopify-Hmac-Sha256 header value for this exact body."""
    return _base64_hmac_sha256(secret, body)


def sign_woocommerce(secret: str, body: bytes | str) -> str:
    """The X-WC-Webhook-Signature header value for this exact body."""
    return _base64_hmac_sha256(secret, body)
