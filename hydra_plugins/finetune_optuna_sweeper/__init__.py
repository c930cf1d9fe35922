"""``hydra/sweeper=finetune_optuna``: an Optuna study as a Hydra sweep (``python -m finetune -m hparams_search=NAME``).

Its YAML keys are hydra-optuna-sweeper's (``direction``, ``n_trials``, ``n_jobs``, ``study_name``,
``storage``, ``sampler``, ``params`` with ``interval()``, ``range()``, ``choice()``, ``tag(log, ...)``),
built on optuna's ask/tell API (optuna >= 4, ``pip install 'finetune[optuna]'``), and it adds:
the study kept in the sweep dir and continued by the same command, or shared by several sweepers
on several machines (``hydra.sweeper.storage``: a database URL or ``journal:PATH``; job dirs by trial
number; a dead sweeper's trials failed and retried after ``heartbeat_s``), pruning from each job's
per-epoch metric, failed and non-finite trials recorded as failed instead of ending the study,
and the best trial printed as a command to paste.

Modules: ``config`` (the schema, registered with Hydra), ``sweeper`` (the plugin class Hydra
instantiates), ``_sweep`` (the ask -> launch -> tell loop), ``_search_space`` (overrides -> optuna
distributions), ``_study`` (the study, its trials' outcomes, the best trial) and ``_guard`` (the
storage optuna gets). Hydra's plugin scan imports every module here on every start of any Hydra app,
except those named ``_*``: only those import optuna (an extra) and torch.

What the sweeper trusts: the command line and the configs, not the sweep dir. A sweep dir is often
someone else's (continuing their study means running with ``hydra.sweep.dir=THEIRS``), so:

* ``optuna.db`` is opened only as a regular SQLite file with no trigger, view or virtual table
  (optuna's schema has none; a link, another file, or such SQL is refused in one line), and every
  storage request may take ``_guard.OPERATION_LIMIT_S`` seconds at most (SQLite's progress handler).
* No pickle is read from a study. Optuna's CMA-ES keeps its state as a pickle in trial attributes and
  unpickles it; the sweeper's storage keeps the pickles this process's sampler writes in memory (a
  continued study recomputes the sampler's state from its trials), and refuses a study whose system
  attributes hold anything that would unpickle into an import or a call, naming the attribute.
* A journal file (``journal:PATH``) is opened only as a regular file, and what optuna replays from it
  goes through the same checks.
* What the sweeper reads back of a study (the fixed overrides, job numbers, the best trial's
  overrides and job dir, the pruner spec, a killed trial's params) is checked for its type and
  range: what is wrong is ignored or refused in one line; text from it is printed with control
  characters escaped. ``multirun.yaml`` is written atomically (a link planted there is replaced).

Not covered: trials someone queued in the study (WAITING) run with their params (optuna only warns
when one is outside the search space); a storage other than SQLite (``hydra.sweeper.storage``) is
guarded against pickles but not time-boxed (a database server has its own statement timeout; a
journal file is replayed whole, however long); a job resumed by hand replays its ``sweep.storage``.
"""
