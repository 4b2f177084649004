"""``python -m magicstyle``: the command line of ``train_free_run.py`` (installed as the ``magicstyle`` command too)."""
import sys

from train_free_run import main

sys.exit(main())
