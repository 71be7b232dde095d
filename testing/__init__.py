"""Seeded tiny models with the real layouts, for the tests and for `erasekit fixtures`."""
