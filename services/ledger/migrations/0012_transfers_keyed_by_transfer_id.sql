-- transfers is the table the ledger inserts into most (several rows per input, by COPY),
-- and its primary key on seq was an index no query used: the history reads (customer_id,
-- seq) through transfers_customer, everything else finds a transfer by transfer_id. Seen
-- in pg_stat_user_indexes after the ledger's integration workload: 0 scans of
-- transfers_pkey (the query list is in repository.py). transfer_id, unique and NOT NULL,
-- becomes the key instead: one index less on every insert, the same guard against a
-- transfer written twice. seq stays: the order of the history and its cursor.
ALTER TABLE transfers
    DROP CONSTRAINT transfers_pkey,
    DROP CONSTRAINT transfers_transfer_id_key,
    ADD CONSTRAINT transfers_pkey PRIMARY KEY USING INDEX transfers_transfer_id_pk;
