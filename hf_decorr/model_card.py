"""Model cards for models trained with the covariance penalty.

`decorr_model_card()` builds a ``huggingface_hub.ModelCard`` that carries the ``hf-decorr``
tag, the penalty's formula, its settings (λ, layers, penalty, pooling, mask) and the final task and
decorrelation metrics; `write_model_card()` writes it as ``README.md`` (atomically). Uploading
a finished folder is the application's job (`hf_decorr.app.hub.push_folder_to_hub()`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .atomic import write_text_atomic
from .config import DECORR_CONFIG_NAME
from .penalties import PENALTIES
from .version import __version__

__all__ = ["MODEL_TAG", "CARD_TAGS", "FORMULA", "decorr_model_card", "trainer_model_card", "write_model_card",
           "looks_like_hub_id", "pipeline_tag_of"]

MODEL_TAG = "hf-decorr"
"""The Hub tag of every model trained with hf_decorr."""
CARD_TAGS = (MODEL_TAG, "decorrelation", "covariance-penalty")
"""The tags of a model card written by hf_decorr."""

FORMULA = (
    "$$\\mathcal{L} = \\mathcal{L}_{\\text{task}} + \\lambda \\sum_{\\ell \\in \\text{layers}} "
    "L_\\Sigma(H_\\ell), \\qquad L_\\Sigma(H) = \\frac{1}{p^2} \\sum_{i,j} |C_{ij}|, \\qquad "
    "C = \\frac{(H - \\bar h)^\\top (H - \\bar h)}{N - 1}$$"
)

_AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
    "token-classification": "AutoModelForTokenClassification",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "question-answering": "AutoModelForQuestionAnswering",
}

# class-name endings of transformers heads → pipeline tag
_HEAD_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForTokenClassification", "token-classification"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForQuestionAnswering", "question-answering"),
)


def pipeline_tag_of(model: Any) -> str | None:
    """The pipeline tag of a transformers model from its head's class name (``BertForSequenceClassification`` →
    ``text-classification``); ``None`` when unknown."""
    name = type(model).__name__
    return next((task for ending, task in _HEAD_TASKS if name.endswith(ending)), None)


def penalty_text(name: str, description: str | None = None) -> str:
    """``name`` and its one-line description, from the penalty registry unless ``description`` is given."""
    if description is None:
        registered = PENALTIES.get(name)
        description = registered.description if registered is not None else ""
    return f"`{name}`: {description}" if description else f"`{name}`"

_METRIC_NAMES = {
    "mapc": "MAPC (mean absolute Pearson correlation)",
    "cvr": "CVR (‖C‖₁ / tr C, without the paper's 1/p²)",
    "tdv": "TdV (variance share of the top-d units)",
    "ud": "UD (units holding the variance share)",
    "pca_ud": "PCA-UD (principal components holding the variance share)",
    "cov_l1": "L_Σ of the evaluation set",
    "live_units": "live units",
    "samples": "samples",
}


def looks_like_hub_id(name: str | None) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``name`` or ``owner/name``) and is not a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~", "pypi:")):
        return False
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return 1 <= len(parts) <= 2 and all(part and set(part) <= allowed for part in parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    return str(value)


def _metrics_tables(metrics: Mapping[str, float], layer_names: Sequence[str]) -> str:
    """Markdown: task metrics, then the decorrelation metrics (mean over layers, and per layer)."""
    lines: list[str] = []
    task = {k: v for k, v in metrics.items() if "decorr" not in k and isinstance(v, (int, float))}
    if task:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in sorted(task.items())]
        lines.append("")
    decorr: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "_decorr_" not in key:
            continue
        name = key.split("_decorr_", 1)[1]
        metric, _, layer = name.partition("/")
        decorr.setdefault(layer or "mean over layers", {})[metric] = value
    if decorr:
        columns = [m for m in _METRIC_NAMES if any(m in d for d in decorr.values())]
        lines.append("| layer | " + " | ".join(_METRIC_NAMES[m] for m in columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        order = [n for n in layer_names if n in decorr] + [n for n in decorr if n not in layer_names]
        for layer in order:
            row = decorr[layer]
            cells = [_fmt(float(row[m])) if m in row and row[m] is not None else "–" for m in columns]
            lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def decorr_model_card(
    *,
    model_name: str,
    decorr_settings: Mapping[str, Any],
    layer_names: Sequence[str],
    metrics: Mapping[str, float],
    task: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    dataset_description: str | None = None,
    training: Mapping[str, Any] | None = None,
    command: str | None = None,
    extra_tags: Sequence[str] = (),
    license: str | None = None,
    penalty_description: str | None = None,
) -> ModelCard:
    """A model card for a model trained with the penalty.

    ``decorr_settings`` is [`decorr_dict()`][hf_decorr.DecorrConfig.decorr_dict], ``layer_names`` the
    resolved module names, ``metrics`` the final evaluation's metrics (``eval_accuracy``,
    ``eval_decorr_mapc``, ``eval_decorr_mapc/<layer>``, …) and ``task`` the pipeline tag
    (``text-classification``, ``text-generation``). ``base_model`` and ``datasets`` go into the
    card's metadata only when they look like Hub ids. The penalty's text is its description in the
    registry ([`hf_decorr.register_penalty()`][hf_decorr.register_penalty]) unless ``penalty_description`` is given.
    """
    tags = [*CARD_TAGS, *extra_tags]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=list(dict.fromkeys(tags)),
        base_model=base_model if looks_like_hub_id(base_model) else None,
        datasets=[d for d in (datasets or []) if looks_like_hub_id(d)] or None,
        license=license,
    )
    auto_class = _AUTO_CLASSES.get(task or "", "AutoModel")
    weight = decorr_settings.get("decorr_weight")
    penalty = decorr_settings.get("decorr_penalty", "cov_l1")
    settings = [
        ("λ (`decorr_weight`)", weight),
        ("penalty (`decorr_penalty`)", penalty),
        ("layers (`decorr_layers`)", list(decorr_settings.get("decorr_layers", []))),
        ("penalised modules", list(layer_names)),
        ("pooling (`decorr_pooling`)", decorr_settings.get("decorr_pooling")),
        ("samples (`decorr_mask`)", decorr_settings.get("decorr_mask")),
        ("λ warm-up steps", decorr_settings.get("decorr_warmup_steps")),
        ("multi-process covariance (`decorr_sync`)", decorr_settings.get("decorr_sync")),
        ("hf_decorr version", decorr_settings.get("hf_decorr_version") or __version__),
    ]
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if looks_like_hub_id(base_model) else (
        f"`{base_model}`" if base_model else "a pretrained model"
    )
    body = [
        f"# {model_name}",
        "",
        f"Fine-tuned from {base_text}"
        + (f" on {dataset_description}" if dataset_description else "")
        + " with hf_decorr — the covariance penalty of Kågebäck & Mogren, "
        "*Disentanglement by Penalizing Correlation* (2017), added to the task loss:",
        "",
        FORMULA,
        "",
        "where H (N × p) holds the N samples (rows) of a penalised layer's p units in a batch.",
        "" if weight else "**λ = 0: this is the unregularised baseline; the penalty was only measured.**",
        "",
        "## Decorrelation settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in settings if value is not None],
        "",
        f"Penalty: {penalty_text(penalty, penalty_description)}. The settings are also in `{DECORR_CONFIG_NAME}`.",
        "",
        "## Final evaluation",
        "",
        _metrics_tables(metrics, layer_names) or "(no evaluation was run)",
        "The decorrelation metrics are those of the paper's Section 3.1, computed over every sample of the "
        "evaluation set (MAPC over live units; CVR = ‖C‖₁ / tr C; UD at the configured variance share).",
        "",
        "## Usage",
        "",
        "The model is a plain `transformers` model; hf_decorr is only needed to train it further with the penalty.",
        "",
        "```python",
        f"from transformers import {auto_class}, AutoTokenizer",
        "",
        f'model = {auto_class}.from_pretrained("{model_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
        "```",
        "",
    ]
    if training:
        body += ["## Training", "", "| hyper-parameter | value |", "|---|---|"]
        body += [f"| {k} | {_fmt(v)} |" for k, v in training.items() if v is not None]
        body.append("")
    if command:
        body += ["Command:", "", "```bash", command, "```", ""]
    body += [
        "## Citation",
        "",
        "```bibtex",
        "@inproceedings{kagebaeck2017disentanglement,",
        "  title={Disentanglement by Penalizing Correlation},",
        "  author={K{\\aa}geb{\\\"a}ck, Mikael and Mogren, Olof},",
        "  booktitle={NIPS 2017 Workshop on Learning Disentangled Features},",
        "  year={2017}",
        "}",
        "```",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def trainer_model_card(
    *,
    model: Any,
    settings: Mapping[str, Any],
    penalty: Any,
    layer_names: Sequence[str],
    log_history: Sequence[Mapping[str, Any]],
    tag_names: Sequence[str],
    model_name: str,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
    metrics: Mapping[str, float] | None = None,
    **card_options: Any,
) -> ModelCard:
    """The card of a trainer's model (what ``DecorrTrainerMixin.create_model_card`` writes).

    ``settings`` are the trainer's [`decorr_dict()`][hf_decorr.DecorrConfig.decorr_dict], ``penalty`` the
    [`Penalty`][hf_decorr.Penalty] it uses (a custom one is named and described), ``metrics`` default
    to the last ``eval_*`` and ``test_*`` entries of ``log_history``; tags are ``tag_names``, the model's own
    ``model_tags`` and ``tags``; ``finetuned_from`` defaults to the model's ``name_or_path`` and ``tasks``
    to the pipeline tag of its head.
    """
    if metrics is None:
        latest: dict[str, dict[str, float]] = {}
        for entry in log_history:
            for prefix in ("eval_", "test_"):
                if any(key.startswith(prefix) for key in entry):
                    latest[prefix] = {k: v for k, v in entry.items() if k.startswith(prefix)}
        metrics = {k: v for part in latest.values() for k, v in part.items()}
    extra = [tags] if isinstance(tags, str) else list(tags or [])
    extra += [t for t in (getattr(model, "model_tags", None) or []) if t not in tag_names]
    task = tasks[0] if isinstance(tasks, list) and tasks else tasks if isinstance(tasks, str) else None
    datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
    if dataset_name:
        datasets.append(dataset_name)
    custom = penalty.name != settings.get("decorr_penalty")
    return decorr_model_card(
        model_name=model_name,
        decorr_settings={**settings, **({"decorr_penalty": penalty.name} if custom else {})},
        layer_names=layer_names,
        metrics=metrics,
        task=task or pipeline_tag_of(model),
        base_model=finetuned_from or getattr(model, "name_or_path", None) or None,
        datasets=datasets or None,
        extra_tags=[*tag_names, *extra],
        license=license,
        penalty_description=penalty.description if custom else None,
        **card_options,
    )


def write_model_card(folder: str | os.PathLike, card: ModelCard) -> str:
    """Write ``card`` as ``folder/README.md`` atomically; returns the path."""
    return os.fspath(write_text_atomic(os.path.join(os.fspath(folder), "README.md"), str(card)))
