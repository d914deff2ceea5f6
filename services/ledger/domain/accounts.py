"""Accounts and transfers, as TigerBeetle keeps them: an account holds posted and pending
debit and credit totals; a transfer moves a positive integer amount from a debit account to a
credit account, with a code saying why and an id derived from its cause. The `Journal`
applies transfers to accounts and keeps them, in order, for the caller to persist."""

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from services.ledger.domain.errors import invariant


ISSUANCE = "program:issuance"
REDEMPTION = "program:redemption"
EXPIRY = "program:expiry"
PROGRAM_ACCOUNTS = (ISSUANCE, REDEMPTION, EXPIRY)


# No hold or adjustment may exceed this: far beyond any real use, well inside the integer
# columns, so an absurd request is refused with a reason. (An absurd purchase fails its
# batch and, after the bounded retries, is dead-lettered alone as processing_failed.)
MAX_POINTS_PER_POSTING = 1_000_000_000


class Code(StrEnum):
    """Why a transfer happened."""

    EARN = "earn"
    MATURE = "mature"
    REVERSE = "reverse"
    DEBT = "debt"
    DEBT_PAYOFF = "debt_payoff"
    HOLD = "hold"
    POST = "post"
    VOID = "void"
    REFUND = "refund"
    EXPIRE = "expire"
    ADJUST = "adjust"


class Phase(StrEnum):
    """TigerBeetle's two-phase flags: a pending transfer is later posted or voided."""

    POSTED = "posted"
    PENDING = "pending"
    POST_PENDING = "post_pending"
    VOID_PENDING = "void_pending"


def available_account(customer_id: str) -> str:
    return f"customer:{customer_id}:available"


def pending_account(customer_id: str) -> str:
    return f"customer:{customer_id}:pending"


def debt_account(customer_id: str) -> str:
    return f"customer:{customer_id}:debt"


@dataclass(slots=True)
class Account:
    account_id: str
    kind: str
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    changed: bool = False

    def check(self) -> None:
        """TigerBeetle's balance flags: customer point accounts can never go below zero,
        the debt account never below zero the other way. Program accounts are loaded only
        as increments in a batch (their totals live in the database, with CHECKs)."""
        if self.kind in ("issuance", "redemption", "expiry"):
            return
        if self.kind in ("available", "pending"):
            invariant(self.debits_posted + self.debits_pending <= self.credits_posted, f"{self.account_id} overdrawn")
        elif self.kind == "debt":
            invariant(self.credits_posted <= self.debits_posted, f"{self.account_id} repaid beyond its debt")
        invariant(min(self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted) >= 0,
                  f"{self.account_id} has a total below zero")


@dataclass(frozen=True, slots=True)
class Transfer:
    transfer_id: uuid.UUID
    debit_account_id: str
    credit_account_id: str
    amount_points: int
    code: Code
    customer_id: str
    ref: str
    phase: Phase = Phase.POSTED
    pending_id: uuid.UUID | None = None
    lot_id: uuid.UUID | None = None
    rule_version: int | None = None
    occurred_at: datetime | None = None


class Journal:
    """Applies transfers to accounts with TigerBeetle's semantics and keeps them, in order,
    for the caller to persist."""

    def __init__(self, accounts: dict[str, Account]) -> None:
        self.accounts = accounts
        self.transfers: list[Transfer] = []

    def post(self, transfer: Transfer) -> Transfer:
        invariant(transfer.amount_points > 0, "a transfer moves a positive amount")
        debit = self.accounts[transfer.debit_account_id]
        credit = self.accounts[transfer.credit_account_id]
        amount = transfer.amount_points
        if transfer.phase is Phase.POSTED:
            debit.debits_posted += amount
            credit.credits_posted += amount
        elif transfer.phase is Phase.PENDING:
            debit.debits_pending += amount
            credit.credits_pending += amount
        elif transfer.phase is Phase.POST_PENDING:
            debit.debits_pending -= amount
            credit.credits_pending -= amount
            debit.debits_posted += amount
            credit.credits_posted += amount
        else:  # VOID_PENDING
            debit.debits_pending -= amount
            credit.credits_pending -= amount
        debit.changed = credit.changed = True
        debit.check()
        credit.check()
        self.transfers.append(transfer)
        return transfer


def new_program_accounts() -> dict[str, Account]:
    return {a: Account(a, a.split(":")[1]) for a in PROGRAM_ACCOUNTS}


def trial_balance(accounts: Iterable[Account]) -> tuple[int, int]:
    """(posted debits - posted credits, pending debits - pending credits) over all accounts: both 0."""
    posted = pending = 0
    for a in accounts:
        posted += a.debits_posted - a.credits_posted
        pending += a.debits_pending - a.credits_pending
    return posted, pending
