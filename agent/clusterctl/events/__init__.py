"""Events: ``log`` records every change clusterctl makes, ``outbox`` tracks what the
control plane has acknowledged."""
