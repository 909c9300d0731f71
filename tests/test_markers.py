"""`pytest -m cuda tests` selects exactly the tests that skip for want of CUDA, and no other."""

import json
import os
import subprocess
import sys
from pathlib import Path

from markers import CUDA, NEEDS_CUDA_REASON

TESTS = Path(__file__).resolve().parent

# A plugin for the child pytest: records what `-m cuda` kept and dropped, and each test's skip reasons.
PLUGIN = '''
import json, os

def _skips(item):
    out = []
    for m in item.iter_markers("skipif"):
        condition = m.args[0] if m.args else m.kwargs.get("condition")
        out.append([bool(condition) if not isinstance(condition, str) else condition,
                    str(m.kwargs.get("reason", ""))])
    return out

_dropped = []

def pytest_deselected(items):
    _dropped.extend(items)

def pytest_collection_finish(session):
    record = {"kept": {i.nodeid: _skips(i) for i in session.items},
              "dropped": {i.nodeid: _skips(i) for i in _dropped}}
    with open(os.environ["CUDA_SELECTION_OUT"], "w") as f:
        json.dump(record, f)
'''


def test_cuda_marker_selects_exactly_the_cuda_tests(tmp_path):
    (tmp_path / "cuda_selection_plugin.py").write_text(PLUGIN)
    out = tmp_path / "selection.json"
    env = {**os.environ, "CUDA_SELECTION_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "cuda_selection_plugin", "-p", "no:cacheprovider", str(TESTS)],
                          capture_output=True, text=True, timeout=300, cwd=TESTS.parent, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    kept, dropped = record["kept"], record["dropped"]
    assert kept and dropped

    def skips_without_cuda(skips):
        # the needs_cuda skip; where there is no CUDA its condition must also be true (it skips here)
        return any(reason == NEEDS_CUDA_REASON and (CUDA or condition is True) for condition, reason in skips)

    assert [n for n, s in kept.items() if not skips_without_cuda(s)] == []  # every selected test is a CUDA one
    assert [n for n, s in dropped.items() if skips_without_cuda(s)] == []  # and none is left out
    assert not any("needs CUDA" in r or "need CUDA" in r for s in dropped.values() for _, r in s)
    assert f"{len(kept)}/{len(kept) + len(dropped)} tests collected" in proc.stdout
