"""The three small networks of Kågebäck & Mogren (2017), as ``transformers`` models.

Each is a ``PreTrainedModel`` with its own ``PretrainedConfig`` (so ``save_pretrained`` /
``from_pretrained`` / ``AutoModel`` work) whose ``forward`` returns a ``ModelOutput`` with a
``loss``; ``DecorrTrainer`` attaches the penalty to them through ``decorr_layers`` exactly as it
does to a transformer. The penalised layers are plain modules whose output is ``(batch, p)``:

* `LinearAutoencoder` (``model_type="decorr_linear_autoencoder"``): ``x ∈ R^D`` →
  ``code = W_e x + b_e ∈ R^p`` (module ``code``) → ``x̂ = W_d code + b_d``;
  ``loss = mean((x̂ − x)²)`` over samples and the ``D`` features (the paper's experiment 1).
* `XorMLP` (``model_type="decorr_xor_mlp"``): ``h₁ = σ(W₁x + b₁)``, ``h₂ = σ(W₂h₁ + b₂)``
  (modules ``hidden.0``, ``hidden.1``), one logistic output ``ŷ = σ(w·h₂ + b)``;
  ``loss = BCE(ŷ, y)`` (experiment 2).
* `ConvAutoencoder` (``model_type="decorr_conv_autoencoder"``): LeNet-like encoder of two
  ``conv → activation → 2×2 max-pool`` blocks and two dense layers, the second being the code
  (module ``code``, ``code_size`` units, 84 as in LeNet-5's F6 and the paper); a mirrored decoder
  of two dense layers and two ``2× nearest upsampling → conv`` blocks, sigmoid output in [0, 1];
  ``loss = mean((x̂ − x)²)`` over pixels (experiment 3).

Weights start from Glorot-uniform with zero biases (the Keras defaults the paper used), not the
``N(0, 0.02)`` default of ``PreTrainedModel``, which is made for wide transformers.
Importing this module registers the three ``model_type``s with ``AutoConfig`` and ``AutoModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

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

ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _activation(name: str, option: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"{option}={name!r} is not a known activation; choose one of {sorted(ACTIVATIONS)}") from None


def _positive_int(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
    return value


@dataclass
class AutoencoderOutput(ModelOutput):
    """``loss`` (scalar MSE), ``reconstruction`` (same shape as the input) and ``code`` ``(batch, p)``."""

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    code: torch.Tensor | None = None


@dataclass
class ClassifierOutput(ModelOutput):
    """``loss`` (scalar BCE), ``logits`` ``(batch, 1)`` and the hidden layers' outputs."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class _PaperPreTrainedModel(PreTrainedModel):
    """Shared weight init: Glorot-uniform weights, zero biases (Keras defaults)."""

    base_model_prefix = "model"
    _no_split_modules: list[str] = []

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


# ---- experiment 1: linear autoencoder -----------------------------------------------------------


class LinearAutoencoderConfig(PretrainedConfig):
    """``input_dim`` = D (observed features), ``code_dim`` = p (coding units)."""

    model_type = "decorr_linear_autoencoder"

    def __init__(self, input_dim: int = 10, code_dim: int = 10, **kwargs) -> None:
        self.input_dim = _positive_int(input_dim, "input_dim")
        self.code_dim = _positive_int(code_dim, "code_dim")
        super().__init__(**kwargs)


class LinearAutoencoder(_PaperPreTrainedModel):
    """Linear encoder ``code`` (D → p) and linear decoder (p → D); MSE reconstruction loss."""

    config_class = LinearAutoencoderConfig
    main_input_name = "input_values"

    def __init__(self, config: LinearAutoencoderConfig) -> None:
        super().__init__(config)
        self.code = nn.Linear(config.input_dim, config.code_dim)
        self.decoder = nn.Linear(config.code_dim, config.input_dim)
        self.post_init()

    def forward(self, input_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> AutoencoderOutput:
        """``input_values`` ``(batch, D)``; ``labels`` the target (defaults to the input)."""
        code = self.code(input_values)
        reconstruction = self.decoder(code)
        target = input_values if labels is None else labels
        loss = F.mse_loss(reconstruction, target)
        return AutoencoderOutput(loss=loss, reconstruction=reconstruction, code=code)


# ---- experiment 2: XOR MLP ------------------------------------------------------------------------


class XorMLPConfig(PretrainedConfig):
    """``input_dim`` inputs, ``hidden_sizes`` units per hidden layer, ``activation`` of the hidden layers."""

    model_type = "decorr_xor_mlp"

    def __init__(
        self,
        input_dim: int = 2,
        hidden_sizes: list[int] | tuple[int, ...] = (4, 4),
        activation: str = "sigmoid",
        **kwargs,
    ) -> None:
        self.input_dim = _positive_int(input_dim, "input_dim")
        sizes = list(hidden_sizes)
        if not sizes:
            raise ValueError("hidden_sizes must hold at least one layer width")
        self.hidden_sizes = [_positive_int(s, "hidden_sizes") for s in sizes]
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not a known activation; choose one of {sorted(ACTIVATIONS)}"
            )
        self.activation = activation
        super().__init__(**kwargs)


class XorMLP(_PaperPreTrainedModel):
    """``hidden.i = activation(Linear)``; one logistic output unit trained with binary cross-entropy."""

    config_class = XorMLPConfig
    main_input_name = "input_values"

    def __init__(self, config: XorMLPConfig) -> None:
        super().__init__(config)
        widths = [config.input_dim, *config.hidden_sizes]
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), _activation(config.activation, "activation"))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.output = nn.Linear(widths[-1], 1)
        self.post_init()

    def forward(self, input_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ClassifierOutput:
        """``input_values`` ``(batch, input_dim)``; ``labels`` 0/1 of shape ``(batch,)`` or ``(batch, 1)``."""
        h = input_values
        states = []
        for layer in self.hidden:
            h = layer(h)
            states.append(h)
        logits = self.output(h)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.reshape(logits.shape).to(logits.dtype))
        return ClassifierOutput(loss=loss, logits=logits, hidden_states=tuple(states))


# ---- experiment 3: convolutional autoencoder ----------------------------------------------------------


class ConvAutoencoderConfig(PretrainedConfig):
    """LeNet-like convolutional autoencoder.

    ``image_size`` (square, divisible by 4), ``num_channels``, ``conv_channels`` (two widths),
    ``kernel_size`` (odd; 'same' padding), ``hidden_size`` (first dense layer), ``code_size``
    (the code), ``activation`` (hidden layers) and ``code_activation`` (the code layer).
    """

    model_type = "decorr_conv_autoencoder"

    def __init__(
        self,
        image_size: int = 8,
        num_channels: int = 1,
        conv_channels: list[int] | tuple[int, int] = (16, 32),
        kernel_size: int = 3,
        hidden_size: int = 120,
        code_size: int = 84,
        activation: str = "relu",
        code_activation: str = "relu",
        **kwargs,
    ) -> None:
        self.image_size = _positive_int(image_size, "image_size")
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two 2×2 poolings), got {image_size}")
        self.num_channels = _positive_int(num_channels, "num_channels")
        channels = list(conv_channels)
        if len(channels) != 2:
            raise ValueError(f"conv_channels must hold two widths (two conv layers), got {channels!r}")
        self.conv_channels = [_positive_int(c, "conv_channels") for c in channels]
        self.kernel_size = _positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {kernel_size}")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.code_size = _positive_int(code_size, "code_size")
        for option, name in (("activation", activation), ("code_activation", code_activation)):
            if name not in ACTIVATIONS:
                raise ValueError(f"{option}={name!r} is not a known activation; choose one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.code_activation = code_activation
        super().__init__(**kwargs)


class ConvAutoencoder(_PaperPreTrainedModel):
    """Encoder ``conv-pool-conv-pool-dense-code``; decoder ``dense-dense-up-conv-up-conv``; MSE loss.

    ``pixel_values`` ``(batch, C, S, S)`` in [0, 1]; the code is ``(batch, code_size)``.
    """

    config_class = ConvAutoencoderConfig
    main_input_name = "pixel_values"

    def __init__(self, config: ConvAutoencoderConfig) -> None:
        super().__init__(config)
        c, (c1, c2), k = config.num_channels, config.conv_channels, config.kernel_size
        act = config.activation
        self.small = config.image_size // 4
        flat = c2 * self.small * self.small
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, k, padding=k // 2),
            _activation(act, "activation"),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, k, padding=k // 2),
            _activation(act, "activation"),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, config.hidden_size),
            _activation(act, "activation"),
        )
        self.code = nn.Sequential(
            nn.Linear(config.hidden_size, config.code_size), _activation(config.code_activation, "code_activation")
        )
        self.decoder_dense = nn.Sequential(
            nn.Linear(config.code_size, config.hidden_size),
            _activation(act, "activation"),
            nn.Linear(config.hidden_size, flat),
            _activation(act, "activation"),
        )
        self.decoder_conv = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c2, c1, k, padding=k // 2),
            _activation(act, "activation"),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c1, c, k, padding=k // 2),
            nn.Sigmoid(),
        )
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> AutoencoderOutput:
        """``pixel_values`` ``(batch, C, S, S)``; ``labels`` the target (defaults to the input)."""
        code = self.code(self.encoder(pixel_values))
        h = self.decoder_dense(code).view(-1, self.config.conv_channels[1], self.small, self.small)
        reconstruction = self.decoder_conv(h)
        target = pixel_values if labels is None else labels
        loss = F.mse_loss(reconstruction, target)
        return AutoencoderOutput(loss=loss, reconstruction=reconstruction, code=code)


for _config, _model in (
    (LinearAutoencoderConfig, LinearAutoencoder),
    (XorMLPConfig, XorMLP),
    (ConvAutoencoderConfig, ConvAutoencoder),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
