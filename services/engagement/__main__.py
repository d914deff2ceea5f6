"""`python -m services.engagement`: run the engagement service (HTTP, consumers, dispatcher)."""

from services.engagement.main import create_app
from services.engagement.settings import EngagementSettings
from shared.http import serve

if __name__ == "__main__":
    serve("engagement", EngagementSettings(), create_app)
