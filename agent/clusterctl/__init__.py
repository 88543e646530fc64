"""clusterctl: a host agent for AI cluster nodes."""

__version__ = "0.1.0"
