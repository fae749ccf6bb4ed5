"""Secure transmission gateway for My Number card applications.

Devices in the ward office post submissions; the gateway checks who they are and what
they may send, keeps a durable encrypted copy, answers 202, and relays each submission
over mutual TLS to its channel's destination.
"""

__version__ = "0.1.0"
