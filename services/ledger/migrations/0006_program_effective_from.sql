-- A program version governs the inputs recorded from its effective time on (versions.py):
-- the choice no longer depends on when the ledger applied an input, so a rebuild makes it
-- the same. Versions saved before took effect when they were saved.
ALTER TABLE program_versions ADD COLUMN effective_from timestamptz;
UPDATE program_versions SET effective_from = created_at;
ALTER TABLE program_versions ALTER COLUMN effective_from SET NOT NULL;
