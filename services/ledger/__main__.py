"""`python -m services.ledger`: run the ledger (HTTP API, Kafka consumers, scheduler)."""

from services.ledger.main import create_app
from services.ledger.settings import LedgerSettings
from shared.http import serve

if __name__ == "__main__":
    serve("ledger", LedgerSettings(), create_app)
