"""Throw-away gateways for the tests, the demo and the bench, and their fakes."""
