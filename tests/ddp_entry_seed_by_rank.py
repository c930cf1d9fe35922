"""Run by tests/test_distributed.py under torchrun: ``python -m finetune`` with ``seed=RANK`` added,
so that the processes compose different configs (as different overrides or environments would)."""

import os
import sys

from finetune.__main__ import main

if __name__ == "__main__":
    sys.argv = ["finetune", *sys.argv[1:], f"seed={os.environ.get('RANK', '0')}"]
    main()
