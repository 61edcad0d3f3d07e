"""The demo (scripts/demo.sh) runs end to end and its backends agree with the reference."""
import re

import pytest

from shl_kernels import demo


def test_demo_runs_and_backends_agree(capsys):
    pytest.importorskip("faiss")
    demo.main()
    out = capsys.readouterr().out
    diffs = [float(m) for m in re.findall(r"max\|grad - torch grad\|=(\S+)", out)]
    assert diffs and max(diffs) < 1e-6
    assert "suspect missing labels" in out and "flagged pairs of this batch ignored" in out
