"""The ledger's rules, pure, one module per use case: earning (lots, tiers, multipliers),
returns and debt, redemptions (holds, late redemptions, refunds), adjustments, expiry; what
they share in accounts (accounts, transfers, the journal), books (a customer's lots, holds
and balance) and errors. No I/O here. Importers use this package as one namespace
(`from services.ledger import domain as d`).

Accounts and transfers follow TigerBeetle: an account keeps posted and pending debit and
credit totals, a transfer moves an integer amount from a debit account to a credit account
with a code saying why, and its id derives from the event that caused it. Program accounts
(issuance, redemption, expiry) sit on the other side of every customer movement, so the sum
of all debits always equals the sum of all credits.

Each customer has three accounts:
- available (credit-normal): spendable points; holds are pending debits on it;
- pending (credit-normal): earned points still inside the return window;
- debt (debit-normal): points owed: reversed by a return after they had been spent, or
  redeemed by a fulfilment that arrived after its hold was voided and found them spent.

`CustomerBook` is one customer's state as loaded for a batch (accounts, the lots and holds
the batch needs); operations mutate it and append transfers to a `Journal`. The service
persists what changed.
"""

from services.ledger.domain.accounts import (
    EXPIRY, ISSUANCE, MAX_POINTS_PER_POSTING, PROGRAM_ACCOUNTS, REDEMPTION, Account, Code, Journal, Phase, Transfer,
    available_account, debt_account, new_program_accounts, pending_account, trial_balance,
)
from services.ledger.domain.adjustments import (
    OPENING_BALANCE, Adjustment, adjust, adjustment_transfer_id, is_opening_balance, opening_balance_id,
)
from services.ledger.domain.books import (
    Balance, CustomerBook, Hold, LineEarning, Lot, check_book, purchase_ref, spendable_lots,
)
from services.ledger.domain.earning import (
    Earned, Earning, calculate_earning, earn, history_earns, line_net_amount, utc_day,
)
from services.ledger.domain.errors import (
    AccountUnknown, AdjustmentIdReused, InsufficientPoints, InvalidAmount, InvariantViolated, LedgerError,
    UnknownCurrency, invariant,
)
from services.ledger.domain.expiry import expire, mature
from services.ledger.domain.redemptions import (
    LateRedemption, hold, post_hold, redeem_after_void, refund, void_hold,
)
from services.ledger.domain.returns import (
    Reversed, apply_returned_lines, returned_points_after, reverse_return,
)
from services.ledger.domain.tiers import (
    TierMoved, in_tier_window, qualifying_at, qualifying_points_of, requalify, tier_at,
)

__all__ = [
    "EXPIRY", "ISSUANCE", "MAX_POINTS_PER_POSTING", "PROGRAM_ACCOUNTS", "REDEMPTION", "Account", "Code",
    "Journal", "Phase", "Transfer", "available_account", "debt_account", "new_program_accounts",
    "pending_account", "trial_balance", "OPENING_BALANCE", "Adjustment", "adjust", "adjustment_transfer_id",
    "is_opening_balance", "opening_balance_id", "Balance", "CustomerBook", "Hold", "LineEarning", "Lot",
    "check_book", "purchase_ref", "spendable_lots", "Earned", "Earning", "calculate_earning", "earn",
    "history_earns", "line_net_amount", "utc_day", "AccountUnknown", "AdjustmentIdReused", "InsufficientPoints",
    "InvalidAmount", "InvariantViolated", "LedgerError", "UnknownCurrency", "invariant", "expire", "mature",
    "LateRedemption", "hold", "post_hold", "redeem_after_void", "refund", "void_hold", "Reversed",
    "apply_returned_lines", "returned_points_after", "reverse_return", "TierMoved", "in_tier_window",
    "qualifying_at", "qualifying_points_of", "requalify", "tier_at",
]
