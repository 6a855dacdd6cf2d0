"""Configuration of the decorrelation penalty: a dataclass mixin for ``TrainingArguments``.

``DecorrConfig`` must come *before* ``TrainingArguments`` in the bases, because
``TrainingArguments.__post_init__`` does not call ``super()``::

    @dataclass
    class MyArgs(DecorrConfig, TrainingArguments): ...

The other order (``class MyArgs(TrainingArguments, DecorrConfig)``) would skip the validation
of the decorr settings, so it is refused with a ``TypeError`` when the class is created.

``decorr_config.json`` (written beside every checkpoint and final model) holds exactly the
fields of [`DecorrConfig`][hf_decorr.DecorrConfig], so it reads back with
[`DecorrConfig.from_json()`][hf_decorr.DecorrConfig.from_json] or
``HfArgumentParser(DecorrConfig).parse_json_file(path)``.

Every field has ``help`` metadata, so ``HfArgumentParser`` turns them into CLI flags
(``--decorr_weight 0.1 --decorr_layers -1 -2``) and reads them from YAML.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .atomic import write_text_atomic
from .gram import PRECISIONS
from .penalties import PENALTIES, PenaltyNames
from .pooling import MASK_SOURCES, POOLINGS

__all__ = [
    "DecorrConfig",
    "DecorrTrainingArguments",
    "DecorrSeq2SeqTrainingArguments",
    "DECORR_CONFIG_NAME",
    "DEFAULT_DECORR_WEIGHT",
    "SYNC_MODES",
    "check_base_order",
]

DECORR_CONFIG_NAME = "decorr_config.json"
"""The file name of the decorr settings saved beside every checkpoint and final model."""
SYNC_MODES = ("global", "local")
"""The values of ``decorr_sync``."""
# Measured on pretrained MiniLM / SST-2: see docs/choosing-lambda.md.
DEFAULT_DECORR_WEIGHT = 1.0
# written into decorr_config.json by hf_decorr 0.1.0; ignored when reading
_LEGACY_VERSION_KEY = "hf_decorr_version"

#: the class ``DecorrConfig.from_json()`` is called on (``typing.Self`` needs Python 3.11)
_ConfigT = TypeVar("_ConfigT", bound="DecorrConfig")


def check_base_order(cls: type, mixin: type, base: type, method: str) -> None:
    """Raise ``TypeError`` when a subclass of ``base`` precedes ``mixin`` in ``cls``'s MRO.

    ``base.<method>`` does not call ``super()`` (or overrides the mixin's), so ``mixin``'s version
    would never run: the mixin must come first in the bases. The message shows the order to write.
    """
    mro = cls.__mro__
    if mixin not in mro:
        return
    for klass in mro[: mro.index(mixin)]:
        if issubclass(klass, base) and not issubclass(klass, mixin):
            right = sorted(cls.__bases__, key=lambda b: not issubclass(b, mixin))
            wrong = ", ".join(b.__name__ for b in cls.__bases__)
            raise TypeError(
                f"class {cls.__name__}({wrong}): {mixin.__name__} must come before {klass.__name__} in the bases, "
                f"because {klass.__name__}.{method} does not call super() and {mixin.__name__}'s would never run; "
                f"write class {cls.__name__}({', '.join(b.__name__ for b in right)})"
            )


if TYPE_CHECKING:  # a mixin of TrainingArguments: type checkers see the fields it is mixed with
    from transformers import TrainingArguments as _ArgumentsBase
else:
    _ArgumentsBase = object


@dataclass
class DecorrConfig(_ArgumentsBase):
    """Settings of the covariance penalty ``λ · Σ_layers L_Σ`` (Kågebäck & Mogren 2017)."""

    decorr_weight: float = field(
        default=DEFAULT_DECORR_WEIGHT,
        metadata={
            "help": "λ, the weight of the penalty: loss = task loss + λ_t · Σ_layers L_Σ. 0 trains exactly like a "
            "plain Trainer and only logs the penalty."
        },
    )
    decorr_layers: list[str] = field(
        default_factory=lambda: ["last"],
        metadata={
            "help": "Layers to penalise: 'last', 'all', indices into the stack of transformer blocks ('-1', '0'), "
            "'encoder:-1' / 'decoder:0' for encoder-decoder models, module-name globs ('model.layers.*.mlp'), or '.' "
            "(the model's own output)."
        },
    )
    decorr_penalty: str = field(
        default="cov_l1",
        metadata={
            "help": "Penalty: a name registered with hf_decorr.register_penalty. Built in: 'cov_l1' (the paper's "
            "L_Σ), 'decov', 'vicreg' (covariance term) or 'l1' (L1 activation).",
            "choices": PenaltyNames(),
        },
    )
    decorr_pooling: str = field(
        default="tokens",
        metadata={
            "help": "What a sample is for (batch, sequence, p) outputs: 'tokens' (every non-padding token), 'mean' "
            "(masked mean per sequence), 'first' or 'last' (first / last non-padding token).",
            "choices": list(POOLINGS),
        },
    )
    decorr_mask: str = field(
        default="attention_mask",
        metadata={
            "help": "Which positions count as samples: 'attention_mask' (non-padding) or 'labels' (positions whose "
            "label is not -100, e.g. completion tokens only).",
            "choices": list(MASK_SOURCES),
        },
    )
    decorr_warmup_steps: int = field(
        default=0,
        metadata={"help": "Ramp λ linearly from λ/W to λ over the first W optimizer steps (0: constant λ)."},
    )
    decorr_sync: str = field(
        default="global",
        metadata={
            "help": "With several processes: 'global' takes the covariance over the samples of all processes (the "
            "paper's batch covariance, differentiable); 'local' over each process's shard.",
            "choices": list(SYNC_MODES),
        },
    )
    decorr_eval_metrics: bool = field(
        default=True,
        metadata={"help": "Add eval_decorr_* metrics (MAPC, CVR, TdV, UD, ...) computed over the whole eval set."},
    )
    decorr_top_d: int = field(
        default=10, metadata={"help": "d of the TdV metric: the variance share of the d units of largest variance."}
    )
    decorr_variance_share: float = field(
        default=0.9, metadata={"help": "Variance share of the UD metric (0.9 gives the paper's UD_90%%)."}
    )
    decorr_log_per_layer: bool = field(
        default=True, metadata={"help": "Also log the penalty and eval metrics of each layer, not only their mean."}
    )
    decorr_stop_on_nonfinite: bool | None = field(
        default=None,
        metadata={
            "help": "Stop training with hf_decorr.DivergenceError when the training loss, the penalty or the gradient "
            "norm becomes NaN or infinite at an optimizer step (under fp16 loss scaling: the gradient norm at 25 "
            "steps in a row), checked on the device and read at logging, evaluation and save steps and at the end, "
            "so no step waits on the host; never save non-finite weights. Default (unset): on when decorr_weight > "
            "0, off at 0, where the trainer behaves exactly like a plain Trainer."
        },
    )
    decorr_precision: str = field(
        default="auto",
        metadata={
            "help": "Matmul precision of the covariance on CUDA: 'fp32' (IEEE float32), 'tf32', 'bf16' (bf16 tensor "
            "cores with float32 accumulation; forward split into hi+lo for float32-like accuracy) or 'auto' "
            "(bf16 on CUDA, chosen from a CPU emulation of bf16 rounding: see docs/PERFORMANCE.md). The CPU always "
            "computes in float32.",
            "choices": list(PRECISIONS),
        },
    )
    decorr_max_samples: int = field(
        default=0,
        metadata={
            "help": "If > 0, the penalty of each layer uses this many random valid tokens per step (static shapes, "
            "seeded by --seed); 0 uses every valid token. Subsampling biases L_Σ upward: see docs/PERFORMANCE.md."
        },
    )
    decorr_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Rows (and covariance columns) processed at a time by the penalty, a multiple of 8; bounds its "
            "transient memory to a few times 4·chunk·p bytes. 0: chunks of about 32 MiB of float32 (chunk·p = 2^23)."
        },
    )
    decorr_log_figures: bool = field(
        default=False,
        metadata={
            "help": "At each evaluation, log the |correlation| heat map and variance spectrum of each penalised layer "
            "as images to TensorBoard / W&B (report_to); needs matplotlib."
        },
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_base_order(cls, DecorrConfig, TrainingArguments, "__post_init__")

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.validate_decorr()

    def validate_decorr(self) -> None:
        """Check the decorr settings; ``ValueError`` naming the option and its valid values (run on construction)."""
        for name in ("decorr_eval_metrics", "decorr_log_per_layer", "decorr_log_figures"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.decorr_stop_on_nonfinite is not None and not isinstance(self.decorr_stop_on_nonfinite, bool):
            raise ValueError(
                "decorr_stop_on_nonfinite must be True, False or None (on when decorr_weight > 0), got "
                f"{self.decorr_stop_on_nonfinite!r}"
            )
        weight = self.decorr_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"decorr_weight must be a number >= 0, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"decorr_weight must be a finite number >= 0, got {weight!r}")
        self.decorr_weight = float(weight)
        layers = self.decorr_layers
        if isinstance(layers, (str, int)):
            layers = [layers]
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError(f"decorr_layers must be a non-empty list of layer specs, got {self.decorr_layers!r}")
        self.decorr_layers = [str(spec).strip() for spec in layers]
        if any(not spec for spec in self.decorr_layers):
            raise ValueError(f"decorr_layers holds an empty spec: {self.decorr_layers!r}")
        for name, value, choices in (
            ("decorr_penalty", self.decorr_penalty, list(PENALTIES)),  # read now: registered penalties count
            ("decorr_pooling", self.decorr_pooling, list(POOLINGS)),
            ("decorr_mask", self.decorr_mask, list(MASK_SOURCES)),
            ("decorr_sync", self.decorr_sync, list(SYNC_MODES)),
            ("decorr_precision", self.decorr_precision, list(PRECISIONS)),
        ):
            if value not in choices:
                hint = ("; a custom penalty must be registered with hf_decorr.register_penalty before the config is "
                        "built or parsed (e.g. import the module that registers it first)"
                        if name == "decorr_penalty" else "")
                raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}{hint}")
        if isinstance(self.decorr_warmup_steps, bool) or not isinstance(self.decorr_warmup_steps, int):
            raise ValueError(f"decorr_warmup_steps must be an integer >= 0, got {self.decorr_warmup_steps!r}")
        if self.decorr_warmup_steps < 0:
            raise ValueError(f"decorr_warmup_steps must be >= 0, got {self.decorr_warmup_steps}")
        if isinstance(self.decorr_top_d, bool) or not isinstance(self.decorr_top_d, int) or self.decorr_top_d < 1:
            raise ValueError(f"decorr_top_d must be an integer >= 1, got {self.decorr_top_d!r}")
        if self.decorr_log_figures and getattr(self, "report_to", None) in ([], "none", ["none"]):
            warnings.warn(
                "decorr_log_figures=True logs the figures through the report_to integrations (TensorBoard, W&B, ...), "
                "but report_to is 'none': no figure will be logged (set report_to='tensorboard', for instance)",
                stacklevel=3,
            )
        if self.decorr_log_figures:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError("decorr_log_figures=True needs matplotlib: pip install 'hf-decorr[plots]'")
        share = self.decorr_variance_share
        if not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
            raise ValueError(f"decorr_variance_share must be in (0, 1], got {share!r}")
        samples = self.decorr_max_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0 or samples == 1:
            raise ValueError(f"decorr_max_samples must be 0 (every token) or an integer >= 2, got {samples!r}")
        chunk = self.decorr_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0 or chunk % 8:
            raise ValueError(f"decorr_chunk_size must be 0 (automatic) or a positive multiple of 8, got {chunk!r}")

    def decorr_weight_at(self, step: int) -> float:
        """λ at optimizer step ``step`` (0-based): ``λ · min(1, (step + 1) / decorr_warmup_steps)``."""
        if self.decorr_warmup_steps <= 0:
            return self.decorr_weight
        return self.decorr_weight * min(1.0, (step + 1) / self.decorr_warmup_steps)

    def decorr_dict(self) -> dict[str, Any]:
        """The decorr settings alone (the fields of [`DecorrConfig`][hf_decorr.DecorrConfig]), as saved in
        ``decorr_config.json``."""
        return {f.name: getattr(self, f.name) for f in fields(DecorrConfig)}

    @classmethod
    def from_json(cls: type[_ConfigT], path: str | os.PathLike, **overrides: Any) -> _ConfigT:
        """Read the settings saved by [`save_decorr_config()`][hf_decorr.DecorrConfig.save_decorr_config] (a
        ``decorr_config.json`` or its folder).

        ``overrides`` are further constructor arguments (for a ``DecorrTrainingArguments``, e.g.
        ``output_dir``) and win over the file. The values are validated as on construction. Keys
        that are not fields of [`DecorrConfig`][hf_decorr.DecorrConfig] are a ``ValueError`` naming them; the key
        ``hf_decorr_version`` written by hf_decorr 0.1.0 is ignored.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, DECORR_CONFIG_NAME)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of decorr settings, got a {type(data).__name__}")
        data.pop(_LEGACY_VERSION_KEY, None)
        known = [f.name for f in fields(DecorrConfig)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown decorr setting(s) {unknown}; the settings are {known}")
        return cls(**{**data, **overrides})

    def save_decorr_config(self, directory: str | os.PathLike) -> str:
        """Write ``decorr_config.json`` into ``directory`` atomically; returns its path."""
        path = os.path.join(directory, DECORR_CONFIG_NAME)
        write_text_atomic(path, json.dumps(self.decorr_dict(), indent=2, sort_keys=True) + "\n")
        return path


@dataclass
class DecorrTrainingArguments(DecorrConfig, TrainingArguments):
    """``TrainingArguments`` plus the decorr settings of [`DecorrConfig`][hf_decorr.DecorrConfig]."""


@dataclass
class DecorrSeq2SeqTrainingArguments(DecorrConfig, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the decorr settings of [`DecorrConfig`][hf_decorr.DecorrConfig]."""
