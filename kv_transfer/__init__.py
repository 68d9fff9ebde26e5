"""KV layout descriptors, the transfer planner and the transports (tcp, collective, mooncake)."""
