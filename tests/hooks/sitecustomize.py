"""Imported at interpreter start by the resume tests' child processes (``tests.signals.child_env`` puts this folder
on their ``PYTHONPATH``): applies the kill switch of ``SPEFT_TEST_SIGNAL_AT_MICRO``."""

import os

if os.environ.get("SPEFT_TEST_SIGNAL_AT_MICRO"):
    from tests.signals import ENV, patch

    patch(setattr, os.environ[ENV])
