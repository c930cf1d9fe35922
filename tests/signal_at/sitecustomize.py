"""Test helper, loaded by every Python process started with this directory on PYTHONPATH
(torchrun's workers, submitit's jobs): with ``FT_SIGNAL_AT=RANK:STEP:SIGNAL`` set, the process
of that rank sends itself SIGNAL right after optimizer update STEP, as a scheduler or a user
would, but at a step the test chooses (``RANK`` as torchrun sets it; 0 without torchrun).
"""

import os

if os.environ.get("FT_SIGNAL_AT"):
    import signal

    from finetune import builders
    from finetune.trainer import TrainerHook

    _rank, _step, _name = os.environ["FT_SIGNAL_AT"].split(":")

    class _SignalAt(TrainerHook):
        def on_step(self, state, logs):
            if state.global_step == int(_step) and os.environ.get("RANK", "0") == _rank:
                os.kill(os.getpid(), getattr(signal, _name))

    _build_run = builders.build_run

    def _with_signal(*args, **kwargs):
        parts = _build_run(*args, **kwargs)
        parts.trainer.hooks.append(_SignalAt())
        return parts

    builders.build_run = _with_signal
