"""The statistics the ``hf-decorr`` subcommands share: a layer's samples as the trainer takes them
([`hf_decorr.analysis.LayerSamples`][hf_decorr.analysis.LayerSamples], with the commands' one-line errors), the
columns of their per-layer tables and a layer's row of metrics.

Statistics are the library's own: [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator] (``n``, ``Σh``,
``Σhhᵀ`` in float64) and [`decorrelation_metrics()`][hf_decorr.decorrelation_metrics], exactly as
``DecorrTrainer.evaluate()`` computes its ``eval_decorr_*`` metrics. Linear CKA between two layers is streamed the
same way (``hf_decorr.analysis.PairedStatistics``): ``CKA(X, Y) = ‖Y_cᵀ X_c‖_F² / (‖X_cᵀ X_c‖_F · ‖Y_cᵀ Y_c‖_F)``
from the centred scatter matrices, so no activation is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ... import analysis
from ...metrics import CovarianceAccumulator, decorrelation_metrics
from ..parser import RecipeError, one_line

__all__ = ["METRIC_COLUMNS", "MAX_HEATMAP_UNITS", "LayerSamples", "metrics_row"]


# (metric key, column header) of the per-layer tables and curves
METRIC_COLUMNS = (
    ("mapc", "MAPC"),
    ("cvr", "CVR"),
    ("tdv", "TdV"),
    ("ud", "UD_90%"),
    ("pca_ud", "PCA-UD"),
    ("live_units", "live units"),
)


#: heat maps (and the covariance block kept in ``statistics.safetensors``) show at most this many units,
#: those of largest variance
MAX_HEATMAP_UNITS = 512


class LayerSamples(analysis.LayerSamples):
    """[`hf_decorr.analysis.LayerSamples`][hf_decorr.analysis.LayerSamples] with its errors as one line naming the
    commands' options (``--layers``, ``--pooling``) instead of the trainer's settings."""

    def samples(self, inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        try:
            return super().samples(inputs)
        except TypeError as err:  # a tokenizer output the model does not accept
            raise RecipeError(f"the model does not accept the tokenizer's inputs: {one_line(err)}") from None
        except ValueError as err:
            raise RecipeError(one_line(err, 400).replace("decorr_pooling", "--pooling")
                              .replace("decorr_layers", "--layers")) from None


def metrics_row(acc: CovarianceAccumulator) -> dict[str, float]:
    """One layer's row of the commands' tables: the paper's metrics of the float64 statistics ``acc``
    (``decorrelation_metrics`` with the trainer's defaults). Not `hf_decorr.app.reporting.layer_metrics()`,
    which picks a recipe's per-layer values out of ``trainer.evaluate()`` metrics."""
    return decorrelation_metrics(acc.covariance(), samples=float(acc.statistics()[0]))
