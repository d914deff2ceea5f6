"""Settings of the ledger service (env prefix LEDGER_)."""

from datetime import datetime
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.auth import CustomerTokenSettings
from shared.settings import ServiceSettings

DEFAULT_PROGRAM_FILE = Path(__file__).parent / "program.yaml"


class LedgerSettings(ServiceSettings, CustomerTokenSettings):
    model_config = SettingsConfigDict(env_prefix="LEDGER_", extra="ignore")

    http_port: int = 8102
    # The program loaded at start; stored as a new version when it differs from the last
    # version loaded from a file (admin changes through the API are kept otherwise).
    program_file: Path = DEFAULT_PROGRAM_FILE
    # Larger request bodies are refused with 413 before being read (a program document is the largest).
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    # X-Admin-Key for /v1/admin/*; without it the admin API answers 503 (disabled). The
    # customer reads (balance, transactions) take it too, for back-office tools.
    admin_api_key: str | None = None
    # The customer reads also take the customer's own bearer token (the same tokens as the
    # rewards API: jwt_* settings of shared/auth.py, LEDGER_JWT_SECRET, ...), for the customer
    # it names only. With no key configured, only the admin key reads.
    # A RedemptionRequested without a usable hold_timeout_s gets this; none lives longer
    # than max_hold_timeout_s, whatever the request says.
    hold_timeout_s: int = Field(default=300, gt=0)
    max_hold_timeout_s: int = Field(default=3600, gt=0)
    # PointsWillExpire goes out this many days before points expire.
    expiry_reminder_days: int = Field(default=30, ge=0)
    # Consumers of purchases.recorded in this process (same group; at most the partition count).
    purchases_consumers: int = Field(default=2, ge=1)
    # How often the scheduler matures, expires, reminds and voids timed-out holds.
    scheduler_interval_s: float = Field(default=60.0, gt=0)
    scheduler_batch_customers: int = Field(default=500, gt=0)
    # How often the liability and invariant gauges are refreshed from the accounts.
    metrics_interval_s: float = Field(default=15.0, gt=0)
    # Tests and demos: a fixed "now", or a shift of the real clock (e.g. 1296000 = 15 days ahead).
    clock_override: datetime | None = None
    clock_offset_s: float = 0.0
