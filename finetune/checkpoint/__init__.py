"""Checkpoint files: deployable weights, training state, the manifest, and the saving policy.

Modules (verified atomic writes and digests are ``finetune.files``'s): ``weights_file`` (weights files and
``load_model``), ``training_state`` (``last.ckpt``: what it holds, RNG), ``manifest``
(``manifest.json`` and verification), ``policy`` (what to save when, file names) and
``manager`` (``CheckpointManager``, the hook that saves, the same code on every rank, and its
writers: ``FileWriter`` on rank 0, ``NoWriter`` elsewhere). Choosing a state to resume from and
restoring it live in ``finetune.resume``.

Every file is written atomically and verified: a temporary file in the same directory,
hashed (BLAKE3) as it is written, flushed and fsynced, its size checked, moved into
place with ``os.replace``, then the directory fsynced. A kill at any moment leaves the
previous file intact. ``manifest.json`` is updated only after the file it describes is
in place, so a manifest entry always describes a complete file.

* ``*.safetensors`` (or ``*.pt`` with ``checkpoint.weights_format=torch``): the model's own
  ``state_dict()`` keys plus string metadata (architecture, classes, head,
  preprocessing), enough to rebuild it alone.
* ``last.ckpt``: the training state for resume; only tensors, dicts, lists and plain
  values, so it loads with ``torch.load(weights_only=True)``. Earlier states are kept as
  ``epochEEE-stepSSSSSS.ckpt`` (hard links of what ``last.ckpt`` was), ``keep_last_k`` of them.

Threads, what each reads, and why it cannot change underneath:

* ``finetune-hash`` (``HashingSink``, one per file written) reads the temporary file itself,
  from the page cache, only up to the bytes that ``write`` calls have already put there. No
  one else writes that file: ``mkstemp`` made it, and it gets its real name only after
  ``finish``. The caller's buffers are never kept past ``write`` (``torch.save`` frees or
  reuses them at once; hashing them later recorded wrong digests under load).
* ``finetune-checkpoint`` (``FileWriter``, a mid-epoch save) writes a snapshot that
  ``detached_copy`` made at the update boundary: every tensor cloned to the CPU, every dict
  and list rebuilt, so training goes on against other memory. It also updates the manifest
  and the policy's file lists; the training thread touches those only after ``wait()``,
  which every other save, ``on_epoch_end`` and ``close`` call first.
* ``finetune-unlink`` removes the second name of a replaced large file; nothing opens that
  name, and it was made only for a file with no other link.
* Hard links (``atomic_link``: periodic states, carried-over best files) share an inode with
  another name, so no file is ever written in place: every write goes to a new temporary
  file that ``os.replace`` then moves over the old name, leaving linked inodes untouched.
"""

from finetune.files import (DIGEST, DIGESTS, FileFacts, HashingSink, atomic_link, atomic_write_stream,
                            atomic_write_text, file_digest, fsync_dir)
from finetune.checkpoint.manager import (Checkpointer, CheckpointManager, CheckpointWriteError, CheckpointWriter,
                                        FileWriter, NoWriter)
from finetune.checkpoint.manifest import Manifest, verify_file
from finetune.checkpoint.policy import (STATE_FILE, CheckpointPolicy, check_policy_state, state_file_name,
                                       top_k_file_name)
from finetune.checkpoint.training_state import (STATE_FORMAT, RunFacts, TrainingParts, detached_copy,
                                                load_training_state, rng_state, save_training_state,
                                                set_rng_state, training_state)
from finetune.checkpoint.weights_file import (WEIGHTS_EXTENSIONS, WEIGHTS_FORMAT, ModelDescription, ModelMeta,
                                              load_model, portable_state_dict, save_weights)

__all__ = [
    "DIGEST", "DIGESTS", "STATE_FILE", "STATE_FORMAT", "WEIGHTS_EXTENSIONS", "WEIGHTS_FORMAT",
    "CheckpointManager", "CheckpointPolicy", "CheckpointWriteError", "CheckpointWriter", "Checkpointer", "FileFacts",
    "FileWriter", "HashingSink", "Manifest", "NoWriter",
    "ModelDescription", "ModelMeta", "RunFacts", "TrainingParts",
    "atomic_link", "atomic_write_stream", "atomic_write_text", "check_policy_state", "detached_copy", "file_digest",
    "fsync_dir",
    "load_model", "load_training_state", "portable_state_dict", "rng_state", "save_training_state",
    "save_weights", "set_rng_state", "state_file_name", "top_k_file_name", "training_state", "verify_file",
]
