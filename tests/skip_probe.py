"""A test that always skips, for `test_skips.py` to run in a child pytest (the file name keeps it out of the
suite: pytest collects it only when named on the command line)."""

import os

import pytest


def test_skips():
    pytest.skip(os.environ["PCVIT_TEST_SKIP_REASON"])
