"""Sealed payloads: the submission encrypted to its final recipient and signed (issue 5)."""
