"""The package version, in a module of its own so that any module can name it (model cards, the
zoo's cache keys) without importing the public API that `opd/__init__.py` re-exports."""

__version__ = "0.1.0"
