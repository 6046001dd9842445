"""``python -m deepplain``: the training CLI (the same as ``train.py`` and ``deepplain-train``)."""
import sys

from .cli import main

sys.exit(main())
