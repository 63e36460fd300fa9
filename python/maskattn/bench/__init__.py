"""Side-by-side benchmarks: maskattn against the seed layers it replaces (``python -m maskattn.bench``)."""
