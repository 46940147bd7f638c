"""Which skips a test run may have: only those of checks that need a CUDA device.

Every other skip means something the run was meant to test did not run (a missing file, server or
package): the golden tests turn theirs into failures (tests/golden/conftest.py), and `--no-skips`
(used by .ci/run) fails the whole run on any of them. The summary at the end of every run counts both.
"""

from __future__ import annotations


def is_cuda_only(reason: str) -> bool:
    """A skip for want of a CUDA device: its reason names CUDA (e.g. "needs CUDA")."""
    return "cuda" in reason.lower()


def skip_reason(report) -> str:
    """The reason of a skipped test report (pytest keeps it as (file, line, reason))."""
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
