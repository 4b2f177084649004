"""``python -m magicstyle``: the command line (the same as ``train_free_run.py`` and the ``magicstyle`` command)."""
import sys

from train_free_run import main

sys.argv[0] = "magicstyle"  # the program name in --help and usage messages
sys.exit(main())
