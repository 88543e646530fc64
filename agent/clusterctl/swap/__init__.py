"""Auto-expanding swap files that clusterctl owns in ``[swap] dir``."""
