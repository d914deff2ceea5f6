"""Settings of the purchases service (env prefix PURCHASES_)."""

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class PurchasesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PURCHASES_", extra="ignore")

    http_port: int = 8101
    # A purchase may be stamped this far in the future (clock skew between tills and us).
    max_clock_skew_s: int = 300
    # Older purchases are refused: likely a replay or a broken till clock.
    max_purchase_age_days: int = 400
    # How long after the sale an anonymous purchase can be claimed by a customer.
    claim_window_days: int = 30
    # A return that arrives before its sale (from another partition or door) waits this long
    # for the sale, then is dead-lettered as unknown_original.
    return_park_s: int = 600
    max_batch_items: int = 500
    # purchases.import (history) is read in larger batches than the live doors: nobody waits
    # on it, and each batch costs the same few round trips whatever its size.
    import_batch_max_records: int = 5000
    import_consumers: int = 2
    max_body_bytes: int = 1_000_000
    # X-Admin-Key for /v1/admin/* (the dead letters: list, show, replay); unset: 503.
    admin_api_key: SecretStr | None = None
    # E-shop webhooks: shared secrets (HMAC-SHA256) and the store id the orders are booked to.
    shopify_webhook_secret: str | None = None
    shopify_store_id: str = "shopify"
    woocommerce_webhook_secret: str | None = None
    woocommerce_store_id: str = "woocommerce"
    # A signed webhook whose own timestamp is older than this is a replay and is refused.
    webhook_max_age_s: int = 6 * 3600  # Shopify retries a failed delivery for about 4 hours
