"""Accuracy, as ``evaluate.load("accuracy")`` computes it, without the Hub or scikit-learn.

The Hub module returns ``float(sklearn.metrics.accuracy_score(references, predictions,
normalize=normalize, sample_weight=sample_weight))``; this one computes the same number with NumPy:
``Σ_i w_i [p_i = r_i] / Σ_i w_i`` (``normalize=True``) or ``Σ_i w_i [p_i = r_i]`` (``normalize=False``),
with ``w_i = 1`` when no weights are given.
"""

import datasets
import evaluate
import numpy

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN). Offline copy of the Hub's `accuracy` metric (single-label).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`boolean`): If set to False, returns the number of correctly classified samples. Otherwise, returns
        the fraction of correctly classified samples. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
Returns:
    accuracy (`float`).
Examples:
    >>> import evaluate
    >>> from hf_decorr.evaluate_metrics import metric_path
    >>> accuracy_metric = evaluate.load(metric_path("accuracy"))
    >>> accuracy_metric.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
    title={Scikit-learn: Machine Learning in {P}ython},
    author={Pedregosa, F. and others},
    journal={Journal of Machine Learning Research},
    volume={12},
    pages={2825--2830},
    year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        if self.config_name not in ("default", None):
            raise ValueError("the offline accuracy module supports single-label classification only")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = numpy.asarray(predictions)
        references = numpy.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in length")
        correct = (predictions == references).astype(numpy.float64)
        if sample_weight is None:
            weights = numpy.ones_like(correct)
        else:
            weights = numpy.asarray(sample_weight, dtype=numpy.float64)
        if normalize:
            score = numpy.average(correct, weights=weights)
        else:
            score = numpy.dot(correct, weights)
        return {"accuracy": float(score)}
