"""The Hydra config tree, installed as the package ``finetune.conf`` (``pkg://finetune.conf``).

It lives at the top of the repository; pyproject.toml maps it into the package so that a
wheel install carries it. Hydra only reads a ``pkg://`` path that holds an ``__init__.py``.
"""
