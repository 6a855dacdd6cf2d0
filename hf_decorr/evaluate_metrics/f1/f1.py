"""F1, as ``evaluate.load("f1")`` computes it, without the Hub or scikit-learn (single-label).

The Hub module returns ``sklearn.metrics.f1_score(references, predictions, labels=labels,
pos_label=pos_label, average=average, sample_weight=sample_weight)``. Per label ``c``, with
weighted counts ``tp_c``, ``pred_c = Σ w [p = c]`` and ``true_c = Σ w [r = c]``:

    F1_c = 2 tp_c / (pred_c + true_c)          (0 when pred_c + true_c = 0, scikit-learn's default)

``binary``: F1 of ``pos_label``; ``macro``: the unweighted mean of F1_c; ``weighted``: the mean
weighted by ``true_c``; ``micro``: ``2 Σ tp_c / (Σ pred_c + Σ true_c)``; ``None``: the array of F1_c.
The labels are ``labels`` if given, else every label seen in predictions or references, sorted.
"""

import datasets
import evaluate
import numpy

_DESCRIPTION = """
The F1 score is the harmonic mean of the precision and recall:
F1 = 2 * (precision * recall) / (precision + recall). Offline copy of the Hub's `f1` metric (single-label).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    labels (`list` of `int`): The labels to include when `average` is not 'binary', and their order when `average`
        is None. Defaults to every label in predictions and references, sorted.
    pos_label (`int`): The positive class when `average='binary'`. Defaults to 1.
    average (`string`): 'binary' (default), 'micro', 'macro', 'weighted' or None (one score per label).
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
Returns:
    f1 (`float` or `array` of `float`).
Examples:
    >>> import evaluate
    >>> from hf_decorr.evaluate_metrics import metric_path
    >>> f1_metric = evaluate.load(metric_path("f1"))
    >>> f1_metric.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0])
    {'f1': 0.5}
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


def _safe_divide(numerator, denominator):
    numerator = numpy.asarray(numerator, dtype=numpy.float64)
    denominator = numpy.asarray(denominator, dtype=numpy.float64)
    out = numpy.zeros(numpy.broadcast(numerator, denominator).shape, dtype=numpy.float64)
    return numpy.divide(numerator, denominator, out=out, where=denominator != 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        if self.config_name not in ("default", None):
            raise ValueError("the offline f1 module supports single-label classification only")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/f1"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        predictions = numpy.asarray(predictions)
        references = numpy.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in length")
        if average not in (None, "binary", "micro", "macro", "weighted"):
            raise ValueError(
                f"average={average!r} is not supported; choose None, 'binary', 'micro', 'macro' or 'weighted'"
            )
        weights = (
            numpy.ones(len(references), dtype=numpy.float64)
            if sample_weight is None
            else numpy.asarray(sample_weight, dtype=numpy.float64)
        )
        present = numpy.union1d(references, predictions)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    "Target is multiclass but average='binary'. Please choose another average setting, one of "
                    "[None, 'micro', 'macro', 'weighted']."
                )
            if len(present) == 2 and pos_label not in present:
                raise ValueError(f"pos_label={pos_label} is not a valid label. It should be one of {list(present)}")
            chosen = numpy.asarray([pos_label])
        elif labels is not None:
            chosen = numpy.asarray(labels)
        else:
            chosen = present
        hits = predictions == references
        tp = numpy.asarray([weights[hits & (references == c)].sum() for c in chosen], dtype=numpy.float64)
        pred = numpy.asarray([weights[predictions == c].sum() for c in chosen], dtype=numpy.float64)
        true = numpy.asarray([weights[references == c].sum() for c in chosen], dtype=numpy.float64)
        if average == "micro":
            score = float(_safe_divide(2.0 * tp.sum(), pred.sum() + true.sum()))
            return {"f1": score}
        per_label = _safe_divide(2.0 * tp, pred + true)
        if average is None:
            return {"f1": per_label}
        if average == "weighted":
            if true.sum() == 0:
                return {"f1": 0.0}
            return {"f1": float(numpy.average(per_label, weights=true))}
        return {"f1": float(numpy.mean(per_label))}
