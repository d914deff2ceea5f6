"""The fault-injection run (bench.chaos) in its quick configuration: purchases, ledger and
rewards as processes on their own broker and durable PostgreSQL, a stream through every door,
each kind of fault injected, and the end state checked against the independent reference."""

import pytest

from bench import chaos

# Longer than the suite's default timeout (pyproject.toml): three services as processes,
# each killed, frozen and restarted, on a machine that may be loaded.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow, pytest.mark.timeout(900)]


async def test_under_kills_freezes_and_restarts_every_purchase_counts_once_and_every_redemption_ends():
    figures = await chaos.run("quick", seed=11)

    assert figures["mismatches"] == 0, "\n".join(figures["mismatch_list"])
    assert all(figures["faults"][kind] >= 1 for kind in chaos.FAULT_KINDS), figures["faults"]
    assert set(figures["faults"]["kill9_by_service"]) == set(chaos.SERVICES), figures["faults"]
    # the stream exercised what the checks are about
    assert figures["inputs"]["malformed"] > 0 and figures["dead_letters"]["distinct"] == figures["inputs"]["malformed"]
    assert figures["answers"].get("http_duplicate", 0) > 0 and figures["inputs"]["returns"] > 0
    assert figures["redemptions"].get("cancelled", 0) > 0
