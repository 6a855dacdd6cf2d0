"""The recipes' shared main loop: one model per run, the baseline and the penalised run, the comparison, the push.

A recipe parses its arguments, prepares its data, and hands the rest to an `Experiment`:

    experiment = Experiment("recipes/text_classification.py", argv, training_args, model_args)
    tokenizer = experiment.load_tokenizer()
    data = ...  # {"train", "validation"[, "test"]}, ready for the trainer
    summary = experiment.run(RunSpec(auto_class=..., make_trainer=..., data=data, task=..., task_columns=...))

`Experiment.run()` trains without (λ = 0) and with the penalty from the same seed (with
``compare_baseline``; else the one configured run), saves each run's ``model/`` folder (weights,
tokenizer, ``decorr_config.json``, model card, ``results.json``) complete or absent, writes
``results.json`` per run, ``comparison.{json,md}`` and ``figures/`` (each penalised layer's heat map
and spectrum, the runs side by side, from the final evaluation's statistics), and pushes the
final model once, after the local output is complete (`hf_decorr.app.hub.push_final_model()`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..atomic import write_text_atomic
from ..capture import resolve_layers
from .hub import push_final_model
from .models import load_model_config_file, load_pretrained_config, load_tokenizer, resolve_model_path
from .outputs import atomic_directory, write_json_atomic
from .parser import RecipeError
from .reporting import comparison_markdown, layer_metrics, log_series, redacted_command
from .workspace import (
    StagedOutput,
    check_output_dir,
    describe_os_error,
    last_checkpoint,
    parse_resume,
)

__all__ = [
    "RunSpec",
    "Experiment",
    "summary_row",
    "take_push_settings",
    "run_baseline_and_penalty",
    "write_comparison",
    "write_layer_figures",
]


def take_push_settings(training_args: Any) -> tuple[bool, str | None, str | None]:
    """Take ``(push_to_hub, hub_model_id, hub_token)`` out of the training arguments.

    The recipes push once, after the local output is complete; the Trainer itself must not
    contact the Hub, so its own push is switched off and the token removed from the arguments
    (which are saved beside the model).
    """
    push, hub_model_id, hub_token = training_args.push_to_hub, training_args.hub_model_id, training_args.hub_token
    if push and not hub_model_id:
        raise RecipeError("--push_to_hub needs --hub_model_id <user or org>/<name>")
    training_args.push_to_hub = False
    training_args.hub_token = None
    return push, hub_model_id, hub_token


def run_baseline_and_penalty(
    output_dir: str, weight: float, compare_baseline: bool, train_one: Callable[[str, str, float], dict]
) -> tuple[dict[str, dict], float]:
    """Train ``("baseline", λ=0)`` and ``("decorr", λ)`` (or the one configured run).

    ``train_one(name, run_dir, weight)`` trains and returns the run's result; with
    ``compare_baseline`` each run gets its own folder under ``output_dir``. Returns the results
    by name (the penalised run last) and the wall time in seconds.
    """
    if compare_baseline:
        runs = [("baseline", 0.0), ("decorr", weight)]
    else:
        runs = [("baseline" if weight == 0 else "decorr", weight)]
    started = time.time()
    results = {}
    for name, run_weight in runs:
        run_dir = os.path.join(output_dir, name) if compare_baseline else output_dir
        results[name] = train_one(name, run_dir, run_weight)
    return results, time.time() - started


def write_layer_figures(output_dir: str, covariances: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``figures/<i>_<layer>.png`` in ``output_dir``: each penalised layer's ``|correlation|`` heat map
    (units by variance) and variance spectrum, the runs side by side, from the final evaluation's
    covariances (`hf_decorr.plotting.save_layer_figures()`). Skipped, with a note, without
    matplotlib. Returns the paths relative to ``output_dir``.
    """
    from ..plotting import require_matplotlib, save_layer_figures

    if not any(covariances.values()):
        return []
    try:
        require_matplotlib()
    except ImportError:
        print("no figures: matplotlib is not installed (pip install 'hf-decorr[plots]')", flush=True)
        return []
    paths = save_layer_figures(os.path.join(output_dir, "figures"), covariances)
    return [os.path.relpath(path, output_dir) for path in paths]


def figures_markdown(figures: Sequence[str]) -> str:
    """Markdown image links to ``figures`` (paths relative to the comparison file)."""
    if not figures:
        return ""
    return ("\n## Figures: |correlation| (units ordered by variance) and variance spectrum of each penalised layer, "
            "final evaluation\n\n" + "\n".join(f"![{os.path.basename(f)}]({f})" for f in figures) + "\n")


def write_comparison(output_dir: str, summary: dict, table: str, command: str) -> None:
    """Write ``comparison.json`` and ``comparison.md`` (complete or absent) into ``output_dir``."""
    write_json_atomic(os.path.join(output_dir, "comparison.json"), summary)
    write_text_atomic(os.path.join(output_dir, "comparison.md"),
                      f"# Baseline vs decorrelation penalty\n\nCommand: `{command}`\n\n{table}")


@dataclasses.dataclass
class RunSpec:
    """What a recipe decides about its runs; `Experiment.run()` does the rest.

    ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) loads the model, with
    ``config_kwargs`` passed to its config; ``make_trainer(model, args)`` builds the trainer on
    ``data`` (``"train"``, ``"validation"`` and optionally ``"test"``, evaluated once at the end);
    ``task_columns`` are the comparison table's task columns ``(key, header, decimals)``, a key
    read from the run's metrics as ``eval_<key>``, ``<key>`` or (test split) ``<key>``;
    ``finish_eval(metrics)`` may add derived metrics (perplexity); ``card`` holds options of the
    trainer's ``create_model_card`` (``tasks``, ``dataset``, ``tags``, ``dataset_description`` and
    recipe-specific ``training`` rows).
    """

    auto_class: Any
    make_trainer: Callable[[Any, Any], Any]
    data: Mapping[str, Any]
    task_columns: Sequence[tuple[str, str, int]]
    note: str = ""
    config_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    card: dict[str, Any] = dataclasses.field(default_factory=dict)
    finish_eval: Callable[[dict], None] | None = None


def summary_row(name: str, result: dict, task_columns: Sequence[tuple[str, str, int]]) -> dict:
    """One row of the comparison: the task metrics of ``task_columns``, the layers' metrics, the logged penalty."""
    eval_metrics, test_metrics = result["eval"], result.get("test") or {}
    row: dict[str, Any] = {"run": name, "decorr_weight": result["decorr_weight"]}
    for key, _, _ in task_columns:
        for source, lookup in ((eval_metrics, f"eval_{key}"), (eval_metrics, key), (test_metrics, key)):
            if lookup in source:
                row[key] = source[lookup]
                break
        else:
            row[key] = None
    penalty, task = result["decorr_loss_log"], result["task_loss_log"]
    row.update({
        "layers": layer_metrics(eval_metrics, result["layers"]),
        "decorr_loss_first": penalty[0] if penalty else None,
        "decorr_loss_last": penalty[-1] if penalty else None,
        "task_loss_first": task[0] if task else None,
        "task_loss_last": task[-1] if task else None,
        "train_runtime": result["train"].get("train_runtime"),
        "model_dir": result["model_dir"],
    })
    return row


class Experiment:
    """One recipe invocation: the command line, the push settings, the model, and the runs.

    ``model_args`` has ``model_name_or_path``, ``tokenizer_name``, ``model_revision`` and
    ``base_model_id``, and may have ``model_config``: a config file from which a new, randomly
    initialised model is built when no ``model_name_or_path`` is given (the tokenizer then comes
    from `use_tokenizer()`). Construction takes the push settings out of ``training_args``
    (the Trainer must not contact the Hub; the push happens once, at the end) and loads the
    model's config, so that a bad model fails before any data is read.
    """

    def __init__(self, program: str, argv: Sequence[str], training_args: Any, model_args: Any,
                 trust_remote_code: bool = False) -> None:
        self.program = program
        self.command = redacted_command(program, argv)
        self.training_args = training_args
        self.model_args = model_args
        self.trust_remote_code = trust_remote_code
        self.tokenizer: Any = None
        self.push, self.hub_model_id, self.hub_token = take_push_settings(training_args)
        # before any data is read: the output folder can be written, the checkpoint to resume from exists
        check_output_dir(training_args.output_dir)
        self.resume = parse_resume(training_args.resume_from_checkpoint)
        self.output = StagedOutput(training_args.output_dir)
        self.new_model_config: Any = None
        self.eval_covariances: dict[str, dict] = {}  # run → {layer: C (p, p)} of its final evaluation (figures)
        config_file = getattr(model_args, "model_config", None)
        if model_args.model_name_or_path:
            load_pretrained_config(model_args.model_name_or_path, trust_remote_code=trust_remote_code,
                                   revision=model_args.model_revision)
        elif config_file:
            self.new_model_config = load_model_config_file(config_file)
        else:
            raise RecipeError("model_name_or_path is required: a Hub model id, a local folder or pypi:<package>"
                              + (" (or model_config: a config file for a new model)"
                                 if hasattr(model_args, "model_config") else ""))

    @property
    def builds_new_model(self) -> bool:
        """Whether the model is built from ``model_config`` (randomly initialised) rather than loaded."""
        return self.new_model_config is not None

    def load_tokenizer(self):
        """The tokenizer of ``tokenizer_name`` or of the model (one-line errors)."""
        model_args = self.model_args
        self.tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path,
                                        "tokenizer_name" if model_args.tokenizer_name else "model_name_or_path",
                                        trust_remote_code=self.trust_remote_code, revision=model_args.model_revision)
        return self.tokenizer

    def use_tokenizer(self, tokenizer):
        """Use ``tokenizer`` (e.g. a character tokenizer for a new model); its size sets the new model's vocabulary."""
        self.tokenizer = tokenizer
        return tokenizer

    def _model(self, spec: RunSpec):
        model_args = self.model_args
        if self.builds_new_model:
            config = copy.deepcopy(self.new_model_config)
            tok = self.tokenizer
            config.vocab_size = len(tok)
            config.pad_token_id, config.bos_token_id, config.eos_token_id = (
                tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
            for key, value in spec.config_kwargs.items():
                setattr(config, key, value)
            return spec.auto_class.from_config(config)
        config = load_pretrained_config(model_args.model_name_or_path, trust_remote_code=self.trust_remote_code,
                                        revision=model_args.model_revision, **spec.config_kwargs)
        return spec.auto_class.from_pretrained(resolve_model_path(model_args.model_name_or_path), config=config,
                                               trust_remote_code=self.trust_remote_code,
                                               revision=model_args.model_revision)

    def train_one(self, name: str, run_dir: str, weight: float, spec: RunSpec) -> dict:
        """Train one model with ``decorr_weight = weight``; save ``run_dir/model`` and ``run_dir/results.json``."""
        from transformers import set_seed

        model_args, base = self.model_args, self.training_args
        args = dataclasses.replace(base, output_dir=run_dir, decorr_weight=weight, run_name=base.run_name or name)
        set_seed(args.seed)
        model = self._model(spec)
        try:  # a bad decorr_layers spec is bad input: one line, before any training
            resolve_layers(model, args.decorr_layers)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        trainer = spec.make_trainer(model, args)
        print(f"\n=== run {name!r}: decorr_weight={weight}, penalised layers {trainer.decorr_layer_names} ===",
              flush=True)
        resume = self.resume if isinstance(self.resume, str) else last_checkpoint(run_dir) if self.resume else None
        if resume:
            print(f"resuming run {name!r} from {resume}", flush=True)
        elif self.resume:
            print(f"run {name!r} has no checkpoint in {run_dir} to resume from: it starts over", flush=True)
        train_output = trainer.train(resume_from_checkpoint=resume)
        eval_metrics = trainer.evaluate()
        self.eval_covariances[name] = dict(trainer.decorr_last_eval_covariances)
        if spec.finish_eval is not None:
            spec.finish_eval(eval_metrics)
        test_metrics = trainer.evaluate(spec.data["test"], metric_key_prefix="test") if "test" in spec.data else None
        model_dir = os.path.join(run_dir, "model")
        final_model_dir = self.output.final_path(model_dir)
        result = {
            "run": name,
            "decorr_weight": weight,
            "decorr": args.decorr_dict(),
            "layers": trainer.decorr_layer_names,
            "train": dict(train_output.metrics),
            "eval": eval_metrics,
            "test": test_metrics,
            "decorr_loss_log": log_series(trainer.state.log_history, "decorr_loss"),
            "task_loss_log": log_series(trainer.state.log_history, "task_loss"),
            "train_samples": len(spec.data["train"]),
            "eval_samples": len(spec.data["validation"]),
            "seed": args.seed,
            "trainer": type(trainer).__name__,
            "command": self.command,
            "model_dir": final_model_dir,
        }
        card_options = dict(spec.card)
        training = {
            "trainer": type(trainer).__name__,
            "learning rate": args.learning_rate,
            "epochs": args.num_train_epochs,
            "max steps": args.max_steps if args.max_steps > 0 else None,
            "batch size (per device)": args.per_device_train_batch_size,
            **card_options.pop("training", {}),
            "seed": args.seed,
            "train runtime (s)": result["train"].get("train_runtime"),
        }
        try:
            with atomic_directory(model_dir) as tmp:
                trainer.save_model(tmp)
                trainer.create_model_card(  # the trainer's own card (the one trainer.push_to_hub() uploads)
                    output_dir=tmp,
                    model_name=args.hub_model_id or os.path.basename(self.output.final_path(run_dir)),
                    finetuned_from=model_args.base_model_id or model_args.model_name_or_path
                    or f"a new model built from {getattr(model_args, 'model_config', None)}",
                    metrics={**eval_metrics, **(test_metrics or {})},
                    training=training,
                    command=self.command,
                    **card_options,
                )
                write_json_atomic(os.path.join(tmp, "results.json"), result)
            write_json_atomic(os.path.join(run_dir, "results.json"), result)
        except OSError as err:  # a full disk, a quota, a folder removed under us: one line
            raise RecipeError(describe_os_error(err, final_model_dir)) from None
        print(f"saved {model_dir}", flush=True)
        return result

    def run(self, spec: RunSpec, compare_baseline: bool) -> dict:
        """Train the run(s), write the comparison, push once; returns the summary (``runs``, ``wall_time_s``).

        Everything is written to ``<output_dir>.partial`` and put in place of ``output_dir`` when
        complete (`hf_decorr.app.workspace`), so ``output_dir`` is complete or absent as a whole.
        """
        if compare_baseline and isinstance(self.resume, str):
            raise RecipeError(
                f"resume_from_checkpoint={self.resume!r} names one checkpoint, but compare_baseline trains two runs; "
                "give resume_from_checkpoint=true: each run continues from its own last checkpoint"
            )
        output_dir = self.output.final
        staging = self.output.begin(self.resume)
        try:
            results, wall_time = run_baseline_and_penalty(
                staging, self.training_args.decorr_weight, compare_baseline,
                lambda name, run_dir, weight: self.train_one(name, run_dir, weight, spec),
            )
            rows = [summary_row(name, result, spec.task_columns) for name, result in results.items()]
            summary: dict[str, Any] = {"command": self.command, "runs": rows, "wall_time_s": wall_time}
            table = comparison_markdown(rows, spec.task_columns, spec.note)
            print("\n" + table, flush=True)
            figures = write_layer_figures(staging, self.eval_covariances)  # paths relative to the output folder
            summary["figures"] = figures
            if compare_baseline:
                write_comparison(staging, summary, table + figures_markdown(figures), self.command)
            self.output.commit()
        except OSError as err:
            raise RecipeError(describe_os_error(err, staging)) from None
        if compare_baseline:
            print(f"written: {os.path.join(output_dir, 'comparison.md')} and comparison.json; "
                  f"wall time {wall_time:.0f} s", flush=True)
        print(f"output complete: {output_dir}", flush=True)
        if self.push and self.hub_model_id:  # take_push_settings refuses --push_to_hub without --hub_model_id
            folder = list(results.values())[-1]["model_dir"]  # the penalised run when comparing
            summary["push"] = push_final_model(folder, self.hub_model_id, self.hub_token, self.training_args)
        return summary

