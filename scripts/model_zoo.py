"""The model zoo: every architecture the installed transformers registers for a task, built tiny, trained
with the plain ``Trainer`` (the control) and with ``DecorrTrainer`` (``decorr_layers=["last"]`` and ``["all"]``).

For each (architecture, task) pair of the task families below:

1. the config class's defaults are shrunk (widths 32, 2 layers, 2 heads, small vocabularies and images, nested
   sub-configs too), the model is built once on the meta device to count its parameters, then for real;
2. **control**: the plain ``Trainer`` trains it 2 steps at batch 4 (a pair the control cannot train is
   *not counted*: it is not a pair users train with the ``Trainer``);
3. **last** and **all**: ``DecorrTrainer`` at λ = 1, same seed and data: it must train 2 steps, log a finite
   positive ``decorr_loss`` in every logging step (0 only in a step where LayerDrop skipped the penalised
   layers, which the trainer warns about), end with weights that differ from the control's (the penalty
   trains something), and evaluate over at least 2 samples with finite ``eval_decorr_*`` metrics (or none
   defined because the layer has no live unit: constant over the evaluation set).

A pair is *supported* when both ``last`` and ``all`` pass; otherwise the first failure's one-line reason is kept.

    python scripts/model_zoo.py                       # every family, writes docs/results/model_zoo.json
    python scripts/model_zoo.py --task image-classification --only resnet vit
    python scripts/model_zoo.py --render               # docs/model-zoo.md from the kept JSON

The fast subset that CI runs is :data:`CI_SUBSET` (tests/test_model_zoo.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import CONFIG_MAPPING, Trainer, TrainingArguments  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from hf_decorr import DecorrTrainer, DecorrTrainingArguments  # noqa: E402

#: task family → the name of transformers' ``MODEL_FOR_<…>_MAPPING_NAMES``
TASKS = {
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
}

#: the most used architectures and the ones that failed before the model-zoo work: run by CI
CI_SUBSET = [
    ("causal-lm", "llama"), ("causal-lm", "mistral"), ("causal-lm", "qwen2"), ("causal-lm", "qwen3"),
    ("causal-lm", "gemma"), ("causal-lm", "gemma2"), ("causal-lm", "gemma3"), ("causal-lm", "phi3"),
    ("causal-lm", "gpt2"), ("sequence-classification", "bert"), ("sequence-classification", "roberta"),
    ("sequence-classification", "deberta-v2"), ("sequence-classification", "modernbert"),
    ("seq2seq-lm", "t5"), ("seq2seq-lm", "bart"), ("image-classification", "vit"),
    ("image-classification", "convnext"), ("audio-classification", "wav2vec2"),
    ("audio-classification", "whisper"),
    # the classes of failures of the issue
    ("seq2seq-lm", "t5gemma2"), ("sequence-classification", "longformer"), ("seq2seq-lm", "led"),
    ("seq2seq-lm", "pegasus_x"), ("sequence-classification", "xlnet"), ("causal-lm", "cpmant"),
    ("seq2seq-lm", "prophetnet"), ("sequence-classification", "canine"), ("sequence-classification", "funnel"),
    ("image-classification", "mobilenet_v1"), ("image-classification", "mobilenet_v2"),
    ("image-classification", "segformer"), ("image-classification", "swiftformer"), ("causal-lm", "olmo_hybrid"),
    ("token-classification", "markuplm"), ("seq2seq-lm", "qwen2_audio"),
]

WIDTH = 32
BATCH = 4
LENGTH = 12
TARGET = 6
IMAGE = 32
MAX_PARAMS = 20_000_000
TIMEOUT_S = 120

_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "d_embed", "embedding_size", "hidden_dim",
               "word_embed_proj_dim", "projection_dim", "text_embed_dim", "vision_embed_dim", "d_latents",
               "output_hidden_size", "encoder_hidden_size", "cross_attention_hidden_size", "proj_dim",
               "encoder_embed_dim", "decoder_hidden_size", "mlp_dim", "hidden_channels", "pooler_hidden_size")
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "depth", "num_blocks", "text_num_hidden_layers",
               "num_self_attends_per_block")
_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads",
              "n_heads", "num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
              "num_self_attention_heads", "num_cross_attention_heads", "text_num_attention_heads")
_FFN_KEYS = ("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
             "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size", "mlp_hidden_size",
             "feed_forward_proj_dim", "expert_intermediate_size", "dense_intermediate_size", "d_inner",
             "decoder_ffn_embed_dim", "encoder_ffn_embed_dim")
_SMALL_INTS = {
    "head_dim": 16, "d_head": 16, "d_kv": 16, "kv_channels": 16, "attention_head_size": 16, "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1,
    "image_size": IMAGE, "vocab_size": None, "num_labels": None, "conv_dim": None, "num_mel_bins": None,
    "max_source_positions": None, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "attention_window": 8, "block_size": 4, "num_random_blocks": 2,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "first_k_dense_replace": 1, "mamba_n_heads": 2, "mamba_d_head": 16, "ssm_state_size": 8, "state_size": 8,
    "mamba_d_state": 8, "time_step_rank": 4, "n_groups": 1, "mamba_n_groups": 1,
    "num_channels_cross_attention": 2,
    "spatial_merge_size": 1, "projector_hidden_size": WIDTH, "text_hidden_size": WIDTH,
    "vision_hidden_size": WIDTH, "audio_hidden_size": WIDTH,
}
_MAX_VOCAB = 2048


def _shrunk_dict(cls: type, values: dict, depth: int = 0) -> dict:
    """The config values of ``cls`` (its defaults overlaid with ``values``) with the sizes made tiny."""
    out = dict(values)
    heads = 2
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if key in _WIDTH_KEYS and value > WIDTH:
                out[key] = WIDTH
            elif key in _LAYER_KEYS and value > 2:
                out[key] = 2
            elif key in _HEAD_KEYS and value > heads:
                out[key] = heads
            elif key in _FFN_KEYS and value > 2 * WIDTH:
                out[key] = 2 * WIDTH
            elif key in _SMALL_INTS and _SMALL_INTS[key] is not None and value > _SMALL_INTS[key]:
                out[key] = _SMALL_INTS[key]
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if key in ("depths", "num_layers", "block_repeats", "stage_num_layers", "num_blocks", "repeats",
                       "depth", "layers"):
                out[key] = [1] * len(value)
            elif key in ("hidden_sizes", "embed_dims", "embed_dim", "hidden_dims", "dims", "channels",
                         "stage_out_channels", "out_channels", "neck_hidden_sizes", "embedding_dims"):
                out[key] = [min(v, 16 * (i + 1)) for i, v in enumerate(value)]
            elif key in ("num_heads", "num_attention_heads", "heads", "num_attention_heads_list"):
                out[key] = [1] * len(value)
            elif key == "attention_window":
                out[key] = [8] * len(value)
    # hybrid stacks: keep the smallest prefix of layer_types that holds every kind of layer
    layers = None
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(out.get(key), int):
            layers = key
            break
    for key in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types"):
        kinds = values.get(key)
        if isinstance(kinds, (list, str)) and len(kinds) > 2 and layers is not None:
            n = next((n for n in range(2, len(kinds) + 1) if set(kinds[:n]) == set(kinds)), len(kinds))
            n = min(n, 8)
            out[key] = kinds[:n]
            out[layers] = n
    if isinstance(values.get("attention_window"), list) and layers is not None:
        out["attention_window"] = [8] * out[layers]
    vocab = values.get("vocab_size")
    if isinstance(vocab, int) and vocab > _MAX_VOCAB:
        # special token ids may sit high in the vocabulary: only shrink when none of them would fall outside
        ids = [v for k, v in values.items() if k.endswith("_token_id") or k.endswith("_token_index")]
        ids = [v for v in ids if isinstance(v, int) and not isinstance(v, bool)]
        if all(v < _MAX_VOCAB for v in ids):
            out["vocab_size"] = _MAX_VOCAB
    for key, sub_cls in getattr(cls, "sub_configs", {}).items():
        sub = values.get(key)
        if isinstance(sub, dict) and depth < 4:
            sub_class = sub_cls
            if sub_cls is transformers.AutoConfig and sub.get("model_type") in CONFIG_MAPPING:
                sub_class = CONFIG_MAPPING[sub["model_type"]]
            out[key] = _shrunk_dict(sub_class, sub, depth + 1)
    return out


def tiny_config(model_type: str, task: str):
    """The config of ``model_type`` with tiny sizes (see the module docstring)."""
    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    values = _shrunk_dict(cls, defaults)
    for key in ("transformers_version", "model_type", "architectures"):
        values.pop(key, None)
    config = cls(**values)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "pad_token_id", 0) is None:
            cfg.pad_token_id = 0
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                    "hidden_dropout", "dropout_rate", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if isinstance(getattr(cfg, key, None), float):
                setattr(cfg, key, 0.0)
    config.num_labels = 3
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = 0
    return config


def model_class(task: str, model_type: str) -> type:
    name = getattr(modeling_auto, TASKS[task])[model_type]
    return getattr(transformers, name)


def build_model(task: str, model_type: str, seed: int = 0):
    """The tiny model of the pair, initialised from ``seed``; ``ValueError`` when it is not tiny."""
    config = tiny_config(model_type, task)
    cls = model_class(task, model_type)
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
    if count > MAX_PARAMS:
        raise ValueError(f"not tiny: {count / 1e6:.1f}M parameters after shrinking")
    torch.manual_seed(seed)
    return cls(config)


def _vocab(config) -> int:
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "decoder", None)):
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 4:
            return vocab
    return 100


def _image_size(config) -> int:
    for cfg in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None)):
        size = getattr(cfg, "image_size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        if isinstance(size, int):
            return size
    return IMAGE


def rows(task: str, model, n: int, seed: int = 0) -> list[dict]:
    """``n`` right-padded examples of the pair's task (random tokens, pixels or audio; fixed by ``seed``)."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    out = []
    vocab = min(_vocab(config), 1000)
    labels = max(2, getattr(config, "num_labels", 2))
    for i in range(n):
        row: dict = {}
        if task in ("image-classification",):
            size = _image_size(config)
            channels = getattr(config, "num_channels", 3)
            row["pixel_values"] = torch.randn(channels, size, size, generator=g)
            row["labels"] = torch.tensor(i % labels)
        elif task == "audio-classification":
            name = model.main_input_name
            if name == "input_values":
                row[name] = torch.randn(4000, generator=g)
                row["attention_mask"] = (torch.arange(4000) < 4000 - 800 * (i % 2)).long()
            else:
                bins = getattr(config, "num_mel_bins", 80)
                if model_type_of(model) == "whisper":
                    frames = 2 * config.max_source_positions
                    row[name] = torch.randn(bins, frames, generator=g)
                else:  # (frames, bins), e.g. the audio spectrogram transformer
                    frames = getattr(config, "max_length", 64)
                    row[name] = torch.randn(frames, bins, generator=g)
            row["labels"] = torch.tensor(i % labels)
        else:
            valid = 4 + (i * 5) % (LENGTH - 3)
            ids = torch.randint(3, vocab, (LENGTH,), generator=g)
            pad = getattr(config, "pad_token_id", 0) or 0
            ids[valid:] = pad
            mask = (torch.arange(LENGTH) < valid).long()
            row["input_ids"], row["attention_mask"] = ids, mask
            if task == "sequence-classification":
                row["labels"] = torch.tensor(i % labels)
            elif task == "token-classification":
                row["labels"] = torch.where(mask.bool(), torch.randint(0, labels, (LENGTH,), generator=g), -100)
            elif getattr(config, "is_encoder_decoder", False):
                row["labels"] = torch.randint(3, vocab, (TARGET,), generator=g)
            else:
                row["labels"] = torch.where(mask.bool(), ids, -100)
        out.append(row)
    return out


def model_type_of(model) -> str:
    return getattr(model.config, "model_type", "")


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def fail(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _args(cls, output_dir: str, **decorr):
    return cls(output_dir=output_dir, max_steps=2, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
               learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
               data_seed=0, disable_tqdm=True, dataloader_num_workers=0, **decorr)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@dataclass
class PairResult:
    task: str
    model_type: str
    status: str  # "supported", "fails", "control fails", "not built"
    reason: str = ""
    layers: dict | None = None  # setting → the penalised layers
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:400] if text else type(error).__name__


def check_pair(task: str, model_type: str) -> PairResult:
    """Control, then ``last`` and ``all`` at λ = 1 (see the module docstring)."""
    start = time.perf_counter()
    result = PairResult(task, model_type, "supported", layers={})
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = build_model(task, model_type)
            data = rows(task, model, 2 * BATCH)
            eval_data = rows(task, model, BATCH, seed=1)
        except Exception as error:  # noqa: BLE001 - the reason is the result
            result.status, result.reason = "not built", _one_line(error)
            return result
        try:
            control = Trainer(model=model, args=_args(TrainingArguments, tmp), train_dataset=data)
            control.train()
            reference = _params(model)
        except Exception as error:  # noqa: BLE001
            result.status, result.reason = "control fails", _one_line(error)
            return result
        for setting in ("last", "all"):
            try:
                model = build_model(task, model_type)
                args = _args(DecorrTrainingArguments, tmp, decorr_weight=1.0, decorr_layers=[setting])
                trainer = DecorrTrainer(model=model, args=args, train_dataset=data, eval_dataset=eval_data)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    trainer.train()
                skipped = any("did not run in a training step" in str(w.message) for w in caught)
                result.layers[setting] = trainer.decorr_layer_names
                logged = [h["decorr_loss"] for h in trainer.state.log_history if "decorr_loss" in h]
                # a step whose penalised layers all skipped (LayerDrop) logs 0, and says so in a warning
                positive = [v > 0 or (skipped and v == 0) for v in logged]
                if len(logged) != 2 or not all(math.isfinite(v) for v in logged) or not all(positive) \
                        or not logged[0] > 0:
                    raise AssertionError(f"decorr_loss logged {logged}, expected 2 finite positive values")
                if all(torch.equal(p, reference[n]) for n, p in _params(model).items()):
                    raise AssertionError("the weights equal the control's: the penalty trained nothing")
                metrics = trainer.evaluate()
                # the metrics of a layer that is constant over the evaluation set (no live unit) are undefined
                layers = [k.partition("/")[2] for k in metrics if k.startswith("eval_decorr_cvr/")] or [""]
                suffix = [f"/{name}" if name else "" for name in layers]
                defined = all(math.isfinite(metrics[f"eval_decorr_cvr{s}"])
                              or metrics[f"eval_decorr_live_units{s}"] == 0 for s in suffix)
                if not metrics.get("eval_decorr_samples", 0) >= 2 or not defined:
                    raise AssertionError(f"evaluation metrics {metrics}")
            except Exception as error:  # noqa: BLE001
                result.status = "fails"
                result.reason = f"{setting}: {_one_line(error)}"
                break
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def pairs(tasks: list[str], only: list[str] | None = None) -> list[tuple[str, str]]:
    out = []
    for task in tasks:
        for model_type in getattr(modeling_auto, TASKS[task]):
            if model_type in CONFIG_MAPPING and (not only or model_type in only):
                out.append((task, model_type))
    return out


def summary(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        counts = out.setdefault(r["task"], {"pairs": 0, "trained by the Trainer": 0, "supported": 0})
        counts["pairs"] += 1
        if r["status"] in ("supported", "fails"):
            counts["trained by the Trainer"] += 1
        if r["status"] == "supported":
            counts["supported"] += 1
    return out


SHORT = {"sequence-classification": "seq. cls", "causal-lm": "causal LM", "seq2seq-lm": "seq2seq LM",
         "token-classification": "token cls", "image-classification": "image cls",
         "audio-classification": "audio cls"}


def render(payload: dict) -> str:
    """The support table page (docs/model-zoo.md) from the sweep's result file."""
    tasks = list(TASKS)
    by_type: dict[str, dict[str, dict]] = {}
    for r in payload["pairs"]:
        by_type.setdefault(r["model_type"], {})[r["task"]] = r
    lines = [
        "# Supported architectures",
        "",
        "<!-- generated by `python scripts/model_zoo.py --render` from docs/results/model_zoo.json: do not edit -->",
        "",
        f"Every architecture that transformers {payload['transformers']} registers for six task families, built "
        "tiny from its config class (widths 32, 2 layers, nested sub-configs too), trained 2 steps at batch 4 "
        "with the plain `Trainer` (the control), then with `DecorrTrainer` at λ = 1 under `decorr_layers=[\"last\"]` "
        "and `[\"all\"]`. A pair is **supported** when both train, log a finite positive `decorr_loss` at every "
        "step (0 only where LayerDrop skipped the layers, with the trainer's warning), end with weights that differ "
        "from the control's (the penalty trains something), and evaluate with finite `eval_decorr_*` metrics "
        "(undefined only for a layer without live units, constant over the evaluation set). Pairs that the control "
        f"cannot train (or that cannot be built tiny) are not counted. torch {payload['torch']}; "
        "`python scripts/model_zoo.py` regenerates the result file (about 7 minutes on 2 cores), `--render` this "
        "page.",
        "",
        "| task family | registered pairs | trained by the `Trainer` | supported | share |",
        "|---|---|---|---|---|",
    ]
    total = [0, 0, 0]
    for task in tasks:
        c = payload["summary"].get(task)
        if not c:
            continue
        share = c["supported"] / c["trained by the Trainer"] if c["trained by the Trainer"] else float("nan")
        lines.append(f"| {task} | {c['pairs']} | {c['trained by the Trainer']} | {c['supported']} | {share:.1%} |")
        total = [total[0] + c["pairs"], total[1] + c["trained by the Trainer"], total[2] + c["supported"]]
    lines.append(f"| **all** | {total[0]} | {total[1]} | {total[2]} | {total[2] / max(1, total[1]):.1%} |")
    refused = [r for r in payload["pairs"] if r["status"] == "fails"]
    lines += ["", "## Refused, and what to set instead", ""]
    if refused:
        lines += ["Each fails at the first step with this one line.", "", "| architecture | task | the error |",
                  "|---|---|---|"]
        for r in refused:
            reason = r["reason"].replace("|", "\\|")
            lines.append(f"| `{r['model_type']}` | {r['task']} | {reason} |")
    else:
        lines.append("None.")
    lines += ["", "## Every architecture", "",
              "✓ supported, ✗ refused (above), · not counted (the control fails or it cannot be built tiny: "
              "below), blank: not registered for the task.", "",
              "| architecture | " + " | ".join(SHORT[t] for t in tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    marks = {"supported": "✓", "fails": "✗", "control fails": "·", "not built": "·"}
    for model_type in sorted(by_type):
        cells = [marks[by_type[model_type][t]["status"]] if t in by_type[model_type] else "" for t in tasks]
        lines.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    lines += ["", "## Not counted", "", "| architecture | task | why |", "|---|---|---|"]
    for r in payload["pairs"]:
        if r["status"] in ("control fails", "not built"):
            what = "the plain `Trainer` fails" if r["status"] == "control fails" else "not built tiny"
            reason = r["reason"].replace("|", "\\|")[:200]
            lines.append(f"| `{r['model_type']}` | {r['task']} | {what}: {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--only", nargs="+", help="model types to check (default: every registered one)")
    parser.add_argument("--output", default=os.path.join(REPO_ROOT, "docs", "results", "model_zoo.json"))
    parser.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per pair")
    parser.add_argument("--render", action="store_true",
                        help="only write docs/model-zoo.md from the result file given by --output")
    parser.add_argument("--page", default=os.path.join(REPO_ROOT, "docs", "model-zoo.md"))
    args = parser.parse_args(argv)
    if args.timeout < 1:
        parser.error(f"--timeout must be at least 1 second, got {args.timeout}")
    if args.only:
        known = {model_type for task in args.task for model_type in getattr(modeling_auto, TASKS[task])}
        unknown = sorted(set(args.only) - known)
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: not registered for {', '.join(args.task)} in transformers "
                         f"{transformers.__version__} (e.g. {', '.join(sorted(known)[:8])}, ...)")
    if args.render:
        with open(args.output, encoding="utf-8") as f:
            page = render(json.load(f))
        with open(args.page + ".tmp", "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(args.page + ".tmp", args.page)
        print(f"wrote {args.page}")
        return 0
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    results = []
    todo = pairs(args.task, args.only)
    for i, (task, model_type) in enumerate(todo):
        try:
            with time_limit(args.timeout):
                result = check_pair(task, model_type)
        except TimeoutError as error:
            result = PairResult(task, model_type, "not built", f"TimeoutError: {error}")
        results.append(result.to_dict())
        print(f"[{i + 1}/{len(todo)}] {task} {model_type}: {result.status} {result.reason[:160]}", flush=True)
    payload = {"transformers": transformers.__version__, "torch": torch.__version__,
               "summary": summary(results), "pairs": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.output)
    print(json.dumps(payload["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
