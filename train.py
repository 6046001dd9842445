#!/usr/bin/env python
"""Train a deepplain model: ``python train.py --model van --depth 26`` (see ``--help``)."""
import sys

from deepplain.cli import main

if __name__ == "__main__":
    sys.exit(main())
