"""Retention: what is due and why (pure), the sweeper that erases it, the ledger that
records each erasure, and the certificate of erasure."""
