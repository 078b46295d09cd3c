"""Benchmarks that follow the measurement protocol (../shared/PROTOCOL.md)."""
