"""``python -m magicstyle``: the command line (the same as ``train_free_run.py`` and the ``magicstyle`` command)."""
import sys

from train_free_run import main

sys.exit(main())
