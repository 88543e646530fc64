"""Tuning for Dask and Ollama: ``plan`` decides, ``executor`` applies and reverts,
``state`` keeps the originals, ``monitor`` and ``emergency`` act on memory trouble."""
