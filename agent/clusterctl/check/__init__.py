"""`clusterctl check`: ``run`` reads and measures, ``report`` judges."""
