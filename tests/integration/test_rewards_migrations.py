"""The rewards schema as the migrations build it: applied once, idempotent, and equal to
the schema the code is written against (a change to a migration must change this test)."""

from pathlib import Path

import asyncpg
import pytest

import services.rewards
from shared.db import SHARED_MIGRATIONS, migrate

pytestmark = pytest.mark.asyncio(loop_scope="session")

MIGRATIONS = Path(services.rewards.__file__).parent / "migrations"

EXPECTED_COLUMNS = {
    "rewards": ["reward_id", "name", "description", "cost_points", "kind", "voucher_value", "voucher_currency",
                "stock_remaining", "per_customer_limit", "valid_from", "valid_until", "min_tier", "active",
                "created_at", "updated_at"],
    "coupon_codes": ["reward_id", "code", "redemption_id", "uploaded_at", "assigned_at"],
    "redemptions": ["redemption_id", "customer_id", "reward_id", "idempotency_key", "cost_points", "kind", "status",
                    "ledger_status", "failure_reason", "code", "hold_expires_at", "correlation_id",
                    "request_attempts", "requested_at", "last_requested_at", "fulfilled_at", "finished_at",
                    "delivery_address", "shipment_state", "carrier", "tracking_number", "tracking_url", "shipped_at",
                    "shipped_by", "delivered_at", "delivered_by"],
    "customer_standing": ["customer_id", "available_points", "held_points", "tier", "qualifying_points", "as_of",
                          "updated_at"],
    "inbox": ["consumer", "event_id", "processed_at"],
    "outbox": ["id", "topic", "key", "value", "headers", "created_at"],
    "outbox_failed": ["id", "topic", "key", "value", "headers", "created_at", "failed_at", "error"],
    "schema_migrations": ["name", "applied_at"],
    "dead_letter_replays": ["dead_letter_id", "dlq_topic", "reason", "target_topic", "replayed_by", "replayed_at"],
}
EXPECTED_UNIQUE_INDEXES = {
    "coupon_codes_pkey", "coupon_codes_redemption_id_key", "redemptions_pkey",
    "redemptions_customer_id_idempotency_key_key", "redemptions_voucher_code", "rewards_pkey",
    "customer_standing_pkey", "inbox_pkey", "outbox_pkey", "outbox_failed_pkey", "schema_migrations_pkey",
    "dead_letter_replays_pkey",
}


async def test_the_migrations_build_the_expected_schema_once(database_url):
    first = await migrate(database_url, schema="rewards", migrations_dir=MIGRATIONS)
    again = await migrate(database_url, schema="rewards", migrations_dir=MIGRATIONS)
    conn = await asyncpg.connect(database_url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'rewards' "
            "ORDER BY table_name, ordinal_position")
        unique = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'rewards' AND indexdef LIKE 'CREATE UNIQUE%'")
        checks = await conn.fetchval(
            "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname = 'rewards' AND c.contype = 'c'")
    finally:
        await conn.close()
    shared = [f"shared/{p.name}" for p in sorted(SHARED_MIGRATIONS.glob("*.sql"))]
    assert first == [*shared, "0001_rewards.sql", "0002_shipments.sql"] and again == []
    tables: dict[str, list[str]] = {}
    for row in columns:
        tables.setdefault(row["table_name"], []).append(row["column_name"])
    assert tables == EXPECTED_COLUMNS
    assert {r["indexname"] for r in unique} == EXPECTED_UNIQUE_INDEXES
    # rewards: cost > 0, kind, stock >= 0, limit > 0, voucher has value;
    # redemptions: cost > 0, status, ledger_status, fulfilled has fulfilled_at, shipment state, a
    # shipment only of a fulfilled physical item and complete
    assert checks == 11
