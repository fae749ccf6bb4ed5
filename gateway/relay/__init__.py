"""Delivery to destinations: policy, circuit breaker, sender, workers."""
