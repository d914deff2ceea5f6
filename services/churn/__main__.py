"""`python -m services.churn`: run the service (HTTP API + the four consumers + schedules)."""

from services.churn.main import create_app
from services.churn.settings import ChurnSettings
from shared.http import serve

if __name__ == "__main__":
    serve("churn", ChurnSettings(), create_app)
