"""Decorrelation metrics of Kågebäck & Mogren (2017) as an ``evaluate`` metric.

Load it offline with ``evaluate.load(hf_decorr.evaluate_metrics.metric_path("decorrelation"))``.
The computation is hf_decorr's own (``hf_decorr.metrics``): the samples are streamed into
float64 sufficient statistics and turned into the covariance ``C`` of the whole set.
"""

import datasets
import evaluate
import numpy
import torch

from hf_decorr.metrics import CovarianceAccumulator, decorrelation_metrics

_DESCRIPTION = """
The decorrelation metrics of Kågebäck & Mogren, "Disentanglement by Penalizing Correlation" (2017),
Section 3.1, computed from the sample covariance C (1/(N-1)) of a layer's activations over all the
samples passed in. Each prediction is one sample: a vector of the layer's p units (a pooled sentence
vector, or one token's hidden state; flatten (batch, sequence, p) outputs and drop the padding rows
first). With v = diag C:

- mapc: mean absolute Pearson correlation 2/(p^2-p) sum_{i<j} |C_ij| / sqrt(C_ii C_jj), over live units
  (units with v_i <= 1e-10 max v are dead and left out).
- cvr: covariance/variance ratio ||C||_1 / tr C, without the 1/p^2 printed in the paper (1 = diagonal C).
- tdv: share of the total variance in the top_d units of largest variance.
- ud: number of units (ranked by variance) that hold variance_share of the total variance (UD_90%).
- pca_ud: the same count over the eigenvalues of C (effective rank; not in the paper).
- cov_l1: the penalty L_Sigma = ||C||_1 / p^2 of the whole set.
- live_units, samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of p activations per sample, all rows of the same width.
    top_d (`int`): d of TdV. Defaults to 10.
    variance_share (`float`): the share of UD. Defaults to 0.9 (UD_90%).
Returns:
    mapc, cvr, tdv, ud, pca_ud, cov_l1, live_units, samples (`float` each).
Examples:
    >>> import evaluate
    >>> from hf_decorr.evaluate_metrics import metric_path
    >>> metric = evaluate.load(metric_path("decorrelation"))
    >>> results = metric.compute(predictions=[[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    >>> round(results["mapc"], 4), round(results["cvr"], 4), results["ud"], results["pca_ud"]
    (1.0, 1.8, 2.0, 1.0)
"""

_CITATION = """
@inproceedings{kagebaeck2017disentanglement,
    title={Disentanglement by Penalizing Correlation},
    author={K{\\aa}geb{\\"a}ck, Mikael and Mogren, Olof},
    booktitle={NIPS 2017 Workshop on Learning Disentangled Features},
    year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Decorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
            reference_urls=["https://arxiv.org/abs/1711.01233"],
        )

    def _compute(self, predictions, top_d=10, variance_share=0.9, chunk_size=4096):
        if len(predictions) == 0:
            raise ValueError("decorrelation: no samples were given")
        accumulator = CovarianceAccumulator()
        width = None
        for start in range(0, len(predictions), chunk_size):
            rows = predictions[start : start + chunk_size]
            try:
                block = numpy.asarray(rows, dtype=numpy.float64)
            except ValueError:
                raise ValueError("decorrelation: every prediction must be a vector of the same width p") from None
            if block.ndim != 2 or (width is not None and block.shape[1] != width):
                raise ValueError("decorrelation: every prediction must be a vector of the same width p")
            width = block.shape[1]
            accumulator.update(torch.from_numpy(block))
        metrics = decorrelation_metrics(
            accumulator.covariance(), top_d=top_d, variance_share=variance_share, samples=float(accumulator.count)
        )
        return {key: float(value) for key, value in metrics.items()}
