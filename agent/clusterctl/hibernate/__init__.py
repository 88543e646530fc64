"""`clusterctl hibernate`: idle GPU machines go to sleep by themselves, and say so."""
