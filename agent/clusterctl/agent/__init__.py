"""`clusterctl agent run`: the long-running service (GPU monitor, swap on pressure,
local API and metrics, heartbeats and the event outbox)."""
