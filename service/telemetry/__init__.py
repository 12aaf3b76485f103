"""Metrics, access logs and traces, and the multiprocess plumbing behind them. Used by the
core and the server; depends only on the shared vocabulary (config, errors, exchange) and the
upstream pools' snapshot."""
