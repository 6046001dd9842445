"""The early verdict measured: a corpus of runs with known outcomes (``corpus``) and the scoring of the verdict
and of the loss-only baseline on it (``scoring``). Command line: ``python -m deepplain.verdicts``."""
