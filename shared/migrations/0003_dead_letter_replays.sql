-- Dead letters an operator replayed (shared/deadletters.py): a replay happens once, and who
-- did it and when stays on record.
CREATE TABLE dead_letter_replays (
    dead_letter_id uuid        PRIMARY KEY,
    dlq_topic      text        NOT NULL,
    reason         text        NOT NULL,
    target_topic   text        NOT NULL,
    replayed_by    text        NOT NULL,
    replayed_at    timestamptz NOT NULL DEFAULT now()
);
