"""Everything behind httpx's transport interface: each upstream's client, its admission gate
and retry policy, and the two connection pools (aiohttp's and httpcore's)."""
