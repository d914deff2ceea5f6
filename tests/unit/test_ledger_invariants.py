"""The ledger domain's invariants are raised as a named error, and still are under
`python -O` (which removes asserts)."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.ledger import domain as d

ROOT = Path(__file__).resolve().parents[2]


def test_an_overdrawn_customer_account_is_an_invariant_violation_not_a_refusal():
    account = d.Account("customer:c:available", "available", debits_posted=11, credits_posted=10)
    with pytest.raises(d.InvariantViolated, match="overdrawn"):
        account.check()
    assert not issubclass(d.InvariantViolated, d.LedgerError)  # a bug, never answered as the input's fault


def test_a_debt_repaid_beyond_itself_and_a_negative_total_are_violations():
    with pytest.raises(d.InvariantViolated, match="beyond its debt"):
        d.Account("customer:c:debt", "debt", debits_posted=5, credits_posted=6).check()
    with pytest.raises(d.InvariantViolated, match="below zero"):
        d.Account("customer:c:debt", "debt", debits_pending=-1).check()
    d.Account("customer:c:debt", "debt", debits_posted=6, credits_posted=6).check()


def test_a_transfer_of_no_points_is_a_violation():
    accounts = {a: d.Account(a, "available", credits_posted=10) for a in ("customer:a:available", "customer:b:available")}
    journal = d.Journal(accounts)
    with pytest.raises(d.InvariantViolated, match="positive amount"):
        journal.post(d.Transfer(uuid.uuid4(), "customer:a:available", "customer:b:available", 0, d.Code.ADJUST,
                                "a", "r"))
    assert journal.transfers == []


def test_the_guards_hold_under_python_optimised_mode():
    code = ("from services.ledger import domain as d\n"
            "try:\n"
            "    d.Account('customer:c:available', 'available', debits_posted=11, credits_posted=10).check()\n"
            "except d.InvariantViolated:\n"
            "    print('refused')\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "refused", out.stderr
