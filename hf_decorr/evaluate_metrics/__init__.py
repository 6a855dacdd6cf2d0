"""``evaluate`` metric modules shipped inside hf_decorr, loadable offline.

Each module is a folder holding one script, as on the Hub, so ``evaluate.load`` takes its path::

    import evaluate
    from hf_decorr.evaluate_metrics import metric_path

    decorr = evaluate.load(metric_path("decorrelation"))     # MAPC, CVR, TdV, UD_90%, ... of hidden states
    accuracy = evaluate.load(metric_path("accuracy"))        # same numbers as evaluate.load("accuracy")
    f1 = evaluate.load(metric_path("f1"))                    # same numbers as evaluate.load("f1")

``accuracy`` and ``f1`` mirror the Hub modules' inputs and outputs (which call scikit-learn) for
single-label classification, computed with NumPy, so they need neither the Hub nor scikit-learn.
"""

from __future__ import annotations

import os

__all__ = ["METRIC_MODULES", "metric_path", "load"]

METRIC_MODULES = ("decorrelation", "accuracy", "f1")
_HERE = os.path.dirname(os.path.abspath(__file__))


def metric_path(name: str) -> str:
    """The folder of the shipped metric module ``name`` (pass it to ``evaluate.load``)."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown hf_decorr metric module {name!r}; choose one of {list(METRIC_MODULES)}")
    return os.path.join(_HERE, name)


def load(name: str, **kwargs):
    """``evaluate.load(metric_path(name), **kwargs)``."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
