"""The test suite: one module per promise, shared helpers in tests/helpers.py and fixtures in tests/conftest.py."""
