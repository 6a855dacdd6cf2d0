"""Small ``transformers`` models used by the paper-reproduction recipes (see `.paper`).

Importing this package registers their ``model_type``s with ``AutoConfig`` / ``AutoModel``.
"""

from .paper import (
    ACTIVATIONS,
    AutoencoderOutput,
    ClassifierOutput,
    ConvAutoencoder,
    ConvAutoencoderConfig,
    LinearAutoencoder,
    LinearAutoencoderConfig,
    XorMLP,
    XorMLPConfig,
)

__all__ = [
    "ACTIVATIONS",
    "AutoencoderOutput",
    "ClassifierOutput",
    "LinearAutoencoderConfig",
    "LinearAutoencoder",
    "XorMLPConfig",
    "XorMLP",
    "ConvAutoencoderConfig",
    "ConvAutoencoder",
]
