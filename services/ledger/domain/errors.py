"""The ledger's named errors: a `LedgerError` is a rule refusing an input (its `reason`
is the machine-readable cause); an `InvariantViolated` is a bug."""


class LedgerError(Exception):
    """A rule refused an operation; `reason` is the machine-readable cause."""

    reason = "ledger_error"


class UnknownCurrency(LedgerError):
    reason = "unknown_currency"


class InvariantViolated(Exception):
    """A state the rules can never produce (a lot below zero, an account overdrawn by the
    service's own arithmetic): a bug, never the input's fault, so not a LedgerError. Raised,
    not asserted, so that `python -O` keeps the guard; the transaction fails and nothing
    of it is written."""


def invariant(holds: bool, message: str) -> None:
    if not holds:
        raise InvariantViolated(message)


class InsufficientPoints(LedgerError):
    reason = "insufficient_points"


class InvalidAmount(LedgerError):
    reason = "invalid_amount"


class AdjustmentIdReused(LedgerError):
    """An adjustment_id already applied, sent again with other fields: answering "already
    applied" would hide that the second request was never applied."""

    reason = "adjustment_id_reused"


class AccountUnknown(LedgerError):
    reason = "account_unknown"
