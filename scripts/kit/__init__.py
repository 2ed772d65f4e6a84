"""Helpers shared by tests/ and scripts/: they drive and observe the product, and import none of it, so
the benchmark can measure another checkout's product with them (``--product-root``)."""
