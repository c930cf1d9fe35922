"""``hydra/sweeper=finetune_optuna``: an Optuna study as a Hydra sweep (``python -m finetune -m hparams_search=NAME``).

Its YAML keys are hydra-optuna-sweeper's (``direction``, ``n_trials``, ``n_jobs``, ``study_name``,
``storage``, ``sampler``, ``params`` with ``interval()``, ``range()``, ``choice()``, ``tag(log, ...)``),
built on optuna's ask/tell API (optuna >= 4, ``pip install 'finetune[optuna]'``), and it adds:
the study kept in the sweep dir and continued by the same command, pruning from each job's
per-epoch metric, failed and non-finite trials recorded as failed instead of ending the study,
and the best trial printed as a command to paste.

Modules: ``config`` (the schema, registered with Hydra), ``sweeper`` (the plugin class Hydra
instantiates), ``_sweep`` (the ask -> launch -> tell loop), ``_search_space`` (overrides -> optuna
distributions) and ``_study`` (the study, its trials' outcomes, the best trial). Hydra's plugin scan
imports every module here on every start of any Hydra app, except those named ``_*``: only those
import optuna (an extra) and torch.
"""
