"""Relay: an observable HTTP reverse proxy."""

__version__ = "0.1.0"
