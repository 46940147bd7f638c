"""The skip policy (tests/skips.py): a golden test that skips fails, and --no-skips fails a run on any skip
that is not CUDA-only, while CUDA-only skips stay allowed and are counted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.golden import conftest as golden_conftest
from tests.helpers import REPO


def golden_report(reason: str) -> pytest.TestReport:
    """Drive the golden conftest's report hook over a skipped report, as pytest would."""
    report = pytest.TestReport("tests/golden/test_x.py::test_x", ("tests/golden/test_x.py", 1, "test_x"), {},
                               "skipped", ("tests/golden/test_x.py", 1, f"Skipped: {reason}"), "setup")

    class Outcome:
        def get_result(self):
            return report

    hook = golden_conftest.pytest_runtest_makereport(item=None, call=None)
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(Outcome())
    return report


def test_a_skipped_golden_test_fails():
    report = golden_report("golden file train_step_basic.npz not found")
    assert report.outcome == "failed" and "must not skip" in str(report.longrepr)


def test_a_cuda_only_golden_skip_stays_a_skip():
    assert golden_report("needs CUDA").outcome == "skipped"


@pytest.mark.parametrize("reason, code", [("no server here", 1), ("needs CUDA", 0)])
@pytest.mark.slow
def test_no_skips_fails_the_run_on_any_skip_but_a_cuda_only_one(reason, code):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-skips",
                          "tests/skip_probe.py"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PCVIT_TEST_SKIP_REASON": reason})
    assert run.returncode == code, run.stdout + run.stderr
    assert f"skipped: 1 ({1 - code} CUDA-only, {code} other)" in run.stdout
