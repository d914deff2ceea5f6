-- Its own transaction: VALIDATE scans the transfers holding a lock that lets writes go on.
ALTER TABLE transfers VALIDATE CONSTRAINT transfers_code_check;
ALTER TABLE transfers VALIDATE CONSTRAINT transfers_phase_check;
ALTER TABLE transfers VALIDATE CONSTRAINT transfers_pending_id_only_to_resolve_a_hold;
