"""``python -m magicstyle``: the command line of ``train_free_run.py`` (also installed as the ``magicstyle`` command)."""
import sys

from train_free_run import main

sys.exit(main())
