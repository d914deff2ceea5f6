"""`python -m services.purchases`: run the service (HTTP API + Kafka consumer)."""

import uvicorn

from services.purchases.main import create_app
from services.purchases.settings import PurchasesSettings
from shared.logging import configure_logging


def main() -> None:
    settings = PurchasesSettings()
    configure_logging("purchases", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None,
                timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
