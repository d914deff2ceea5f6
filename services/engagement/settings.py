"""Settings of the engagement service (env prefix ENGAGEMENT_)."""

from datetime import datetime
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings

DEFAULT_JOURNEYS_FILE = Path(__file__).parent / "journeys.yaml"


class EngagementSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENGAGEMENT_", extra="ignore")

    http_port: int = 8104
    max_body_bytes: int = Field(default=200_000, gt=0)
    # X-Admin-Key for /v1/admin/*, staff and customer-data endpoints; unset: 503.
    admin_api_key: SecretStr | None = None
    # What POS / e-shop back-ends send as X-Backend-Key to set contact data and consent or
    # open a complaint (they may not read anything back).
    backend_api_key: SecretStr | None = None
    # Signs the links in messages (unsubscribe, survey, complaint). Required in production;
    # the default only suits a local run.
    link_secret: SecretStr = SecretStr("change-me-local-only")
    public_base_url: str = "http://127.0.0.1:8104"

    journeys_file: Path = DEFAULT_JOURNEYS_FILE

    # Respect rules (defaults; see README)
    cap_interval_h: float = Field(default=16.0, ge=0)
    cap_per_week: int = Field(default=4, ge=1)
    quiet_start_hour: int = Field(default=21, ge=0, le=23)
    quiet_end_hour: int = Field(default=8, ge=0, le=23)
    survey_interval_days: int = Field(default=30, ge=0)
    default_time_zone: str = "Europe/Warsaw"
    default_locale: str = "pl-PL"
    survey_link_valid_days: int = Field(default=14, gt=0)
    followup_deadline_h: float = Field(default=48.0, gt=0)
    detractor_max_nps: int = Field(default=6, ge=0, le=10)
    detractor_max_csat: int = Field(default=2, ge=1, le=5)

    # Dispatcher
    dispatch_interval_s: float = Field(default=1.0, gt=0)
    dispatch_batch: int = Field(default=200, gt=0)
    dispatch_concurrency: int = Field(default=8, gt=0)
    # Dispatch rounds running at once in a process (SKIP LOCKED keeps them apart): one claims
    # and records in PostgreSQL while another waits for the SMTP server.
    dispatch_workers: int = Field(default=2, ge=1, le=16)
    delivery_max_attempts: int = Field(default=5, ge=1)
    delivery_backoff_s: float = Field(default=30.0, ge=0)
    metrics_interval_s: float = Field(default=15.0, gt=0)

    # Email over SMTP (any server: a local catcher, Postfix, a provider's relay)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_tls: bool = False          # implicit TLS (port 465)
    smtp_starttls: bool = False     # STARTTLS after connecting (port 587)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout_s: float = 10.0
    mail_from: str = "Loyalty <loyalty@example.com>"
    message_id_domain: str = "loyalty.local"

    # Webhook channel (an SMS / push provider's gateway): POST, HMAC-signed body.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = 10.0

    # The ledger's admin API, for a journey's points incentive (POST /v1/admin/adjustments).
    ledger_url: str | None = None
    ledger_admin_api_key: SecretStr | None = None

    # Tests and demos: a fixed "now", or a shift of the real clock.
    clock_override: datetime | None = None
    clock_offset_s: float = 0.0
