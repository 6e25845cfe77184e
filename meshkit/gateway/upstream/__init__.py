"""Upstream gRPC channels: the registry, balancing, canary, the direct unary call."""
