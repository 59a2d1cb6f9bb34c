"""A package: its test_base.py must not clash with tests/storage/test_base.py (pytest's prepend import mode)."""
