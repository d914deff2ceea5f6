"""`python -m services.purchases`: run the service (HTTP API + Kafka consumer)."""

from services.purchases.main import create_app
from services.purchases.settings import PurchasesSettings
from shared.http import serve

if __name__ == "__main__":
    serve("purchases", PurchasesSettings(), create_app)
