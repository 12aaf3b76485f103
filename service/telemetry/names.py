"""What every Relay metric family shares: the name prefix and the label sets most use
(label values come from the config or closed sets, never from traffic)."""

PREFIX = "relay"
UPSTREAM = ["upstream"]
UPSTREAM_ROUTE = ["upstream", "route"]
