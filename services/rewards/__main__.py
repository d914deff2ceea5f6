"""`python -m services.rewards`: run the service (HTTP API + points.events consumer)."""

import uvicorn

from services.rewards.main import create_app
from services.rewards.settings import RewardsSettings
from shared.logging import configure_logging


def main() -> None:
    settings = RewardsSettings()
    configure_logging("rewards", level=settings.log_level, json_logs=settings.log_json)
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port, log_config=None,
                timeout_graceful_shutdown=20)


if __name__ == "__main__":
    main()
