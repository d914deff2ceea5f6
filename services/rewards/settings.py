"""Settings of the rewards service (env prefix REWARDS_)."""

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.auth import CustomerTokenSettings
from shared.settings import ServiceSettings


class RewardsSettings(ServiceSettings, CustomerTokenSettings):
    model_config = SettingsConfigDict(env_prefix="REWARDS_", extra="ignore")

    http_port: int = 8103

    # Customer tokens come from the retailer's identity provider: the jwt_* settings of
    # shared/auth.py (REWARDS_JWT_SECRET, REWARDS_JWT_ISSUER, REWARDS_JWT_AUDIENCE, ...).

    # Admin API (X-Admin-Key). Unset: the admin API answers 503 (never open by default).
    admin_api_key: SecretStr | None = None

    # A fulfilled redemption can be cancelled (points refunded) for this long.
    cancellation_window_s: int = Field(default=900, ge=0)
    # How long POST /v1/redemptions waits for the saga's outcome before answering 202.
    saga_wait_ms: int = Field(default=2000, ge=0, le=30_000)
    # Fallback poll of the database while waiting (another instance may own the partition).
    saga_poll_interval_ms: int = Field(default=250, ge=10)
    # How long the ledger keeps a hold before voiding it on its own (RedemptionRequested).
    hold_timeout_s: int = Field(default=300, ge=10)
    # A hold that expires within this margin is not fulfilled: the ledger might void it first.
    hold_safety_margin_s: int = Field(default=15, ge=0)
    # Recovery: a redemption without an answer from the ledger is requested again after this
    # long, and given up (failed, any hold voided) after hold_timeout_s.
    recovery_interval_s: float = Field(default=2.0, gt=0)
    request_resend_after_s: float = Field(default=5.0, gt=0)
    # Longest a fetch of points.events waits at the broker when there is nothing new: bounds
    # the latency the ledger's answers add to the saga (at the cost of more idle fetches).
    consumer_fetch_max_wait_ms: int = Field(default=10, ge=1, le=500)
    # Tier names from lowest to highest, as the ledger reports them in BalanceAfter.tier.
    tier_order: str = "Bronze,Silver,Gold"
    # Stock and coupon pool gauges are re-read from the database this often.
    metrics_sample_interval_s: float = Field(default=10.0, gt=0)

    def tiers(self) -> list[str]:
        return [t.strip() for t in self.tier_order.split(",") if t.strip()]
