"""`python -m services.ledger`: run the ledger (HTTP API, Kafka consumers, scheduler)."""

import uvicorn

from services.ledger.main import create_app
from services.ledger.settings import LedgerSettings
from shared.logging import configure_logging


def main() -> None:
    settings = LedgerSettings()
    configure_logging("ledger", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None,
                timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
