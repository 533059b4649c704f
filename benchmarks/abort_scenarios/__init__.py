"""Scripts that benchmarks/abort_rates.py runs many times per side (see its docstring)."""
