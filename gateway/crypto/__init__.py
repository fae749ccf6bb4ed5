"""Cryptography: TLS contexts, the development PKI, secret files, the spool's envelope,
and sealed payloads for recipients."""
