"""Test helper, loaded by every Python process started with this directory on PYTHONPATH
(torchrun's workers, submitit's jobs): with ``FT_SIGNAL_AT=RANK:STEP:SIGNAL`` set, the process
of that rank sends itself SIGNAL right after optimizer update STEP, as a scheduler or a user
would, but at a step the test chooses (``RANK`` as torchrun sets it; 0 without torchrun).

Before the signal, a background checkpoint save still in flight (``checkpoint.every_n_steps``)
is let finish: the tests state which save is on disk when the signal lands ("last save at step
4"), and on a busy machine two more updates can take less time than writing it. With
``checkpoint.mirror`` the uploads handed over so far are let finish too ("the mirror holds step 8").
What a kill that cuts a write short leaves is tested on its own (tests/test_checkpoint_integrity.py).
"""

import os

if os.environ.get("FT_SIGNAL_AT"):
    import signal
    import threading

    from finetune import builders
    from finetune.trainer import TrainerHook

    _rank, _step, _name = os.environ["FT_SIGNAL_AT"].split(":")

    class _SignalAt(TrainerHook):
        def __init__(self, checkpoint):
            self.checkpoint = checkpoint

        def on_step(self, state, logs):
            if state.global_step == int(_step) and os.environ.get("RANK", "0") == _rank:
                for thread in threading.enumerate():
                    if thread.name == "finetune-checkpoint":
                        thread.join()
                mirror = getattr(self.checkpoint.writer, "mirror", None)
                if mirror is not None:
                    mirror.wait_idle()
                os.kill(os.getpid(), getattr(signal, _name))

    _build_run = builders.build_run

    def _with_signal(*args, **kwargs):
        parts = _build_run(*args, **kwargs)
        parts.trainer.hooks.append(_SignalAt(parts.hooks.checkpoint))
        return parts

    builders.build_run = _with_signal
