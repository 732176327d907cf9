"""Benchmarks: `python -m jdm_train.bench NAME [args]`. Each prints a table of ratios
measured side by side in one run; timing goals live here, never in tests."""
