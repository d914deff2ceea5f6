"""Settings of the churn service's reports (same env prefix CHURN_ as the service's own
settings; kept apart so the reports can be read and changed on their own)."""

from decimal import Decimal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.churn.departures import FactorThresholds


class ReportsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURN_", extra="ignore")

    # A customer is active while their last purchase day is less than this many days old
    # (retention, churn and the loyalty index count active customers).
    active_window_days: int = Field(default=180, ge=1)
    # The rolling window of the indicators, in calendar months ending with the latest month.
    rolling_window_months: int = Field(default=12, ge=1, le=120)
    # Loyalty-matrix cut points; unset: the medians of the base.
    matrix_profitability_cut: Decimal | None = None
    matrix_loyalty_cut: float | None = Field(default=None, ge=0)
    matrix_refresh_interval_s: float = Field(default=3600.0, gt=0)
    departures_interval_s: float = Field(default=300.0, gt=0)
    # Departure factors.
    factor_returns_ratio: Decimal = Field(default=Decimal("0.2"), ge=0)
    factor_unredeemed_points: int = Field(default=500, ge=0)
    factor_no_contact_days: int = Field(default=90, ge=1)
    # Tier names lowest first (the ledger program's tiers): a TierChanged down the list is a tier lost.
    tier_order: list[str] = ["Bronze", "Silver", "Gold"]
    currency: str = "PLN"

    def thresholds(self) -> FactorThresholds:
        return FactorThresholds(self.factor_returns_ratio, self.factor_unredeemed_points, self.factor_no_contact_days)
