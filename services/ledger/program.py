"""The loyalty program as data: earning rules, pending and expiry windows, tiers.

A program document is YAML on disk (services/ledger/program.yaml) and JSON through the admin
API; both validate into `Program`. Every saved document gets a version number and every
posting records the version that produced it. Pure: no I/O here but `load_program_file`.
"""

from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The order in which rules are applied to a purchase; documented in the README and returned
# by the simulator so that nobody has to guess how multipliers combine.
STACKING_ORDER = (
    "net amount per line (quantity x unit price - discount, never below 0)",
    "currency conversion to the program currency (unknown currency: refused)",
    "base rate: points_per_unit per 1.00 of the program currency",
    "product multiplier: the SKU's if listed, else the category's (they do not stack)",
    "campaign multipliers: every campaign active at the purchase time, for its channel and "
    "products, multiplies (campaigns stack with each other)",
    "sum over lines",
    "tier multiplier of the customer's tier before this purchase",
    "floor once per purchase (never per line)",
    "first-purchase bonus (flat points, added after rounding)",
    "daily cap per customer (purchase day, UTC): the excess is not credited",
)


class Campaign(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    multiplier: Decimal = Field(gt=0)
    starts_at: datetime
    ends_at: datetime
    channels: list[Literal["pos", "eshop"]] = ["pos", "eshop"]
    # Empty means every product.
    categories: list[str] = []
    skus: list[str] = []

    @model_validator(mode="after")
    def _window(self) -> "Campaign":
        if self.ends_at <= self.starts_at:
            raise ValueError(f"campaign {self.name!r}: ends_at must be after starts_at")
        if self.starts_at.tzinfo is None or self.ends_at.tzinfo is None:
            raise ValueError(f"campaign {self.name!r}: dates need a time zone (e.g. 2026-12-01T00:00:00Z)")
        return self

    def applies(self, *, occurred_at: datetime, channel: str, sku: str, category: str) -> bool:
        if not (self.starts_at <= occurred_at < self.ends_at) or channel not in self.channels:
            return False
        if not self.categories and not self.skus:
            return True
        return category in self.categories or sku in self.skus


class Tier(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    min_qualifying_points: int = Field(ge=0)
    multiplier: Decimal = Field(gt=0)


class Program(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "Loyalty program"
    currency: str = "PLN"
    points_per_unit: Decimal = Field(default=Decimal("1"), ge=0)
    # 1 unit of the key currency = this many units of the program currency.
    currency_rates: dict[str, Decimal] = {}
    category_multipliers: dict[str, Decimal] = {}
    sku_multipliers: dict[str, Decimal] = {}
    campaigns: list[Campaign] = []
    first_purchase_bonus_points: int = Field(default=0, ge=0)
    daily_cap_points: int | None = Field(default=None, gt=0)
    pending_days: int = Field(default=14, ge=0)
    expiry_days: int = Field(default=365, gt=0)
    tier_window_days: int = Field(default=365, gt=0)
    tiers: list[Tier] = [
        Tier(name="Bronze", min_qualifying_points=0, multiplier=Decimal("1.0")),
        Tier(name="Silver", min_qualifying_points=1000, multiplier=Decimal("1.25")),
        Tier(name="Gold", min_qualifying_points=5000, multiplier=Decimal("1.5")),
    ]

    @field_validator("currency")
    @classmethod
    def _currency_code(cls, v: str) -> str:
        if len(v) != 3 or not v.isalpha():
            raise ValueError("currency must be an ISO 4217 code such as PLN")
        return v.upper()

    @field_validator("currency_rates", "category_multipliers", "sku_multipliers")
    @classmethod
    def _positive(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        bad = [k for k, x in v.items() if x <= 0]
        if bad:
            raise ValueError(f"rates and multipliers must be > 0: {bad}")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[Tier]) -> list[Tier]:
        if not v or v[0].min_qualifying_points != 0:
            raise ValueError("tiers must start with a tier at 0 qualifying points")
        thresholds = [t.min_qualifying_points for t in v]
        if thresholds != sorted(set(thresholds)):
            raise ValueError("tier thresholds must be strictly increasing")
        if len({t.name for t in v}) != len(v):
            raise ValueError("tier names must be unique")
        return v

    def rate_to_program_currency(self, currency: str) -> Decimal | None:
        if currency.upper() == self.currency:
            return Decimal(1)
        return self.currency_rates.get(currency.upper())

    def tier_for(self, qualifying_points: int) -> Tier:
        chosen = self.tiers[0]
        for tier in self.tiers:
            if qualifying_points >= tier.min_qualifying_points:
                chosen = tier
        return chosen

    def tier_named(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return self.tiers[0]  # a tier removed from the program: treat as the entry tier


def load_program_file(path: Path) -> Program:
    return Program.model_validate(yaml.safe_load(path.read_text()) or {})
