"""`python -m services.rewards`: run the service (HTTP API + points.events consumer)."""

from services.rewards.main import create_app
from services.rewards.settings import RewardsSettings
from shared.http import serve

if __name__ == "__main__":
    serve("rewards", RewardsSettings(), create_app)
