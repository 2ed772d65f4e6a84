"""Tools around the product, not part of it: the benchmark (``python -m scripts.bench``), the demo, and
``scripts.kit``, the helpers the tests and the benchmark share (process trees, the upstream server)."""
