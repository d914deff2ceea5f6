-- Transfer codes and phases are domain.Code and domain.Phase, and only a transfer that
-- resolves a hold names one (pending_id). NOT VALID: no scan of the existing transfers under
-- this ALTER's lock; 0010 validates them without blocking writes.
ALTER TABLE transfers ADD CONSTRAINT transfers_code_check CHECK (code IN (
    'earn', 'mature', 'reverse', 'debt', 'debt_payoff', 'hold', 'post', 'void', 'refund', 'expire', 'adjust'
)) NOT VALID;
ALTER TABLE transfers ADD CONSTRAINT transfers_phase_check CHECK (phase IN (
    'posted', 'pending', 'post_pending', 'void_pending'
)) NOT VALID;
ALTER TABLE transfers ADD CONSTRAINT transfers_pending_id_only_to_resolve_a_hold CHECK (
    (pending_id IS NOT NULL) = (phase IN ('post_pending', 'void_pending'))
) NOT VALID;
