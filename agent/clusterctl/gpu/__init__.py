"""`clusterctl gpu`: NVML metrics, states, trends, throttling and VRAM-aware placement."""
