"""The fleet control plane: every node's heartbeats and events, commands, wake."""
