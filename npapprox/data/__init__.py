"""Data sets. The embedded default is scikit-learn's digits (real 8x8 scans, offline)."""
from .digits import load_digits, iterate_minibatches

__all__ = ["iterate_minibatches", "load_digits"]
