"""The project's common library: contracts (events, topics) and plumbing (settings, Kafka,
database, inbox/outbox, metrics, logging, HTTP app skeleton). No business rules live here."""
