"""Which program version governs an input: by its recorded time, never by when it is applied."""

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from services.ledger.program import Program
from services.ledger.versions import ProgramStore

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def store(*versions: tuple[int, datetime, str]) -> ProgramStore:
    s = ProgramStore(program_file=None)  # type: ignore[arg-type]
    s._add([{"version": v, "effective_from": t, "document": Program(points_per_unit=Decimal(rate)).model_dump(mode="json")}
            for v, t, rate in versions])
    return s


def test_the_version_in_force_is_the_latest_effective_by_then_and_the_first_before_any():
    s = store((1, T0, "1"), (2, T0 + timedelta(days=1), "2"), (3, T0 + timedelta(days=10), "3"))
    assert s.at(T0 - timedelta(days=5)).version == 1  # recorded before the first version
    assert s.at(T0).version == 1
    assert s.at(T0 + timedelta(days=1)).version == 2  # effective from its instant
    assert s.at(T0 + timedelta(days=1) - timedelta(microseconds=1)).version == 1
    assert s.at(T0 + timedelta(days=30)).program.points_per_unit == Decimal("3")


def test_a_version_saved_later_with_an_earlier_effective_time_governs_until_the_scheduled_one():
    # v2 scheduled for day 10; v3 saved after it, effective day 2: v3 rules days 2-10, v2 after
    s = store((1, T0, "1"), (2, T0 + timedelta(days=10), "2"), (3, T0 + timedelta(days=2), "3"))
    assert [s.at(T0 + timedelta(days=d)).version for d in (1, 2, 9, 10, 11)] == [1, 3, 3, 2, 2]


def test_equal_effective_times_go_to_the_higher_version_and_adding_a_known_version_changes_nothing():
    s = store((1, T0, "1"), (2, T0, "2"))
    assert s.at(T0).version == 2
    s._add([{"version": 2, "effective_from": T0 + timedelta(days=99), "document": Program().model_dump(mode="json")}])
    assert s.at(T0).version == 2 and s.latest_version == 2


async def test_those_waiting_behind_a_first_load_that_fails_get_its_failure_and_the_next_caller_tries_again():
    import asyncio

    import pytest

    from services.ledger.versions import ProgramHistoryUnavailable

    reads = 0

    async def unreadable() -> list[bytes]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.05)  # a slow broker: each read costs its timeout
        raise TimeoutError("no answer")

    s = ProgramStore(program_file=None, topic="t.ledger.programs", history=unreadable)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*(s.ensure_loaded(None) for _ in range(5)), return_exceptions=True)  # type: ignore[arg-type]
    assert all(isinstance(o, ProgramHistoryUnavailable) for o in outcomes)
    assert reads == 1  # one attempt for the five that asked at once
    with pytest.raises(ProgramHistoryUnavailable):
        await s.ensure_loaded(None)  # type: ignore[arg-type]
    assert reads == 2  # a later caller tries again
