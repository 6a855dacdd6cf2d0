"""hf_decorr: the covariance penalty of Kågebäck & Mogren (2017) for Hugging Face Transformers.

``Loss = task loss + λ · Σ_layers L_Σ`` with ``L_Σ = (1/p²) Σ_{i,j} |C_ij|``, ``C`` the sample
covariance (``1/(N−1)``) of a layer's activations over the batch.
"""

from ._compat import deepspeed_process_state
from .callbacks import DecorrFigureCallback
from .capture import CapturedCall, HiddenStateCapture, LayerChoice, find_block_stacks, resolve_layers
from .config import (
    DECORR_CONFIG_NAME,
    DecorrConfig,
    DecorrSeq2SeqTrainingArguments,
    DecorrTrainingArguments,
)
from .errors import DecorrError, DivergenceError
from .layouts import SequenceLayout, register_layout, to_positions
from .metrics import CovarianceAccumulator, decorrelation_metrics
from .penalties import PENALTIES, Penalty, decorrelation_penalty, get_penalty, masked_covariance, register_penalty
from .pooling import MissingMaskError, mask_from_inputs, pool_hidden
from .quantization import fake_quantize
from .samples import DecorrSamples
from .trainer import MODEL_TAG, DecorrSeq2SeqTrainer, DecorrTrainer, DecorrTrainerMixin
from .version import __version__

__all__ = [
    "__version__",
    "DecorrConfig",
    "DecorrTrainingArguments",
    "DecorrSeq2SeqTrainingArguments",
    "DecorrTrainerMixin",
    "DecorrTrainer",
    "DecorrSeq2SeqTrainer",
    "DecorrFigureCallback",
    "DECORR_CONFIG_NAME",
    "MODEL_TAG",
    "DecorrError",
    "DivergenceError",
    "PENALTIES",
    "Penalty",
    "register_penalty",
    "get_penalty",
    "DecorrSamples",
    "decorrelation_penalty",
    "masked_covariance",
    "CovarianceAccumulator",
    "decorrelation_metrics",
    "HiddenStateCapture",
    "CapturedCall",
    "MissingMaskError",
    "find_block_stacks",
    "resolve_layers",
    "LayerChoice",
    "SequenceLayout",
    "register_layout",
    "to_positions",
    "pool_hidden",
    "mask_from_inputs",
    "fake_quantize",
    "deepspeed_process_state",
]
