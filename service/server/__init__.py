"""Everything that subclasses or drives uvicorn: the proxy listener's protocol (parse-time
guard, request-head checks, coalesced writes, drain-safe close), the listeners, the drain,
worker processes, and the admin and demo apps."""
