"""Swap files clusterctl owns: ``policy`` plans, ``ledger`` remembers, ``executor``
carries a plan out, ``filesystems`` says where swap files can live."""
