-- Fulfilment of physical rewards: the shipment of a fulfilled physical redemption, kept
-- apart from the saga's status (which stays 'fulfilled'). 'awaiting_shipment' is not stored:
-- it is what a fulfilled physical redemption without a shipment is, so the saga writes
-- nothing new and a cancellation before shipping has nothing to undo.

ALTER TABLE redemptions
    -- Where the customer wants the item sent (given with the request; physical rewards only).
    ADD COLUMN delivery_address jsonb,
    ADD COLUMN shipment_state   text,
    ADD COLUMN carrier          text,
    ADD COLUMN tracking_number  text,
    ADD COLUMN tracking_url     text,
    ADD COLUMN shipped_at       timestamptz,
    ADD COLUMN shipped_by       text,
    ADD COLUMN delivered_at     timestamptz,
    ADD COLUMN delivered_by     text;

-- NOT VALID: every existing row has NULL in the new columns, so there is nothing to check,
-- and the table is not scanned under the ALTER's lock. New and updated rows are checked.
ALTER TABLE redemptions ADD CONSTRAINT redemptions_shipment_state
    CHECK (shipment_state IN ('shipped', 'delivered')) NOT VALID;
ALTER TABLE redemptions ADD CONSTRAINT redemptions_shipment_complete CHECK (
    shipment_state IS NULL
    OR (kind = 'physical' AND status = 'fulfilled' AND carrier IS NOT NULL AND shipped_at IS NOT NULL
        AND shipped_by IS NOT NULL AND (shipment_state = 'delivered') = (delivered_at IS NOT NULL))
) NOT VALID;

-- The fulfilment queue, oldest first, without reading every redemption.
CREATE INDEX redemptions_awaiting_shipment ON redemptions (fulfilled_at, redemption_id)
    WHERE kind = 'physical' AND status = 'fulfilled' AND shipment_state IS NULL;
CREATE INDEX redemptions_shipments ON redemptions (shipment_state, fulfilled_at, redemption_id)
    WHERE shipment_state IS NOT NULL;
