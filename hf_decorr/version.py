"""The version of hf_decorr (its own module, so that any module can read it without importing the package)."""

__version__ = "0.2.0"
"""The installed version of hf_decorr (also written into model cards)."""
