"""Settings of the churn service (env prefix CHURN_). Every threshold is documented in
services/churn/README.md; defaults are starting points for a grocery-like rhythm."""

import json
from decimal import Decimal
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class ChurnSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CHURN_", extra="ignore")

    http_port: int = 8105
    # Admin API (X-Admin-Key) guards every route. Unset: the API answers 503.
    admin_api_key: SecretStr | None = None

    # ---- rhythm and risk ----
    # At risk when the days since the last purchase exceed overdue_factor x the rhythm (the
    # customer's median interval between purchase days, or the base's with fewer intervals).
    overdue_factor: float = Field(default=2.0, gt=1)
    # Lost past lost_factor x the rhythm (a longer threshold than at-risk).
    lost_factor: float = Field(default=4.0, gt=1)
    # Fewer own intervals than this: the base's median interval is the rhythm.
    min_intervals: int = Field(default=3, ge=1)
    # Neither own nor base rhythm known (an empty base): this many days.
    default_interval_days: float = Field(default=30.0, gt=0)
    # At risk when the model's probability of being active falls below this (needs a fit).
    p_alive_threshold: float = Field(default=0.3, ge=0, le=1)
    # After recovering, no new at-risk episode for this long.
    cooldown_days: float = Field(default=14.0, ge=0)
    # Per-event alerts (CustomerRecovered, SegmentChanged) only for events that happened within
    # this many days before now: a replay or an import changes the state, never the news.
    alert_horizon_days: float = Field(default=7.0, ge=0)

    # ---- models and value ----
    frequency_model: Literal["mbgnbd", "bgnbd"] = "mbgnbd"
    # "expected purchases in the next N days" on the profile.
    expected_purchases_days: int = Field(default=90, ge=1)
    ltv_horizon_days: int = Field(default=365, ge=1)
    margin_rate: Decimal = Field(default=Decimal("0.30"), ge=0, le=1)
    # Per-category margin rates, JSON {"grocery": "0.25", ...}; other categories: margin_rate.
    category_margin_rates: dict[str, Decimal] = {}
    cost_per_purchase: Decimal = Field(default=Decimal("1.00"), ge=0)
    cost_per_redemption: Decimal = Field(default=Decimal("2.00"), ge=0)
    annual_discount_rate: float = Field(default=0.10, ge=0, lt=10)

    # ---- schedules ----
    evaluation_interval_s: float = Field(default=3600.0, gt=0)
    evaluation_chunk_size: int = Field(default=500, ge=1, le=10_000)
    fit_interval_s: float = Field(default=86_400.0, gt=0)
    rfm_refresh_interval_s: float = Field(default=3600.0, gt=0)
    # Each instance re-reads the latest fit and quintile boundaries this often (another
    # instance may have made them).
    cache_refresh_interval_s: float = Field(default=5.0, gt=0)
    metrics_interval_s: float = Field(default=15.0, gt=0)
    # Run a fit, the boundaries and an evaluation once at start (after an import, say).
    refresh_at_start: bool = True
    # Refresh (boundaries, fit, evaluation) as soon as the base outgrows its snapshot by a
    # fifth (an import, the first days): sensible segments straight after an import.
    refresh_on_growth: bool = True

    @field_validator("category_margin_rates", mode="before")
    @classmethod
    def _json_rates(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else {}
        return value

    def margin_for(self, category: str) -> Decimal:
        return self.category_margin_rates.get(category, self.margin_rate)
