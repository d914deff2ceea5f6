"""The purchases service: the front door for POS terminals and e-shops."""
