"""Every example runs (examples that CI does not run rot)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
#: what an example's output must say (default: it trained with QFX)
SAYS = {"brevitas_import.py": "OK: 0 mismatching samples"}


def test_examples_exist():
    assert EXAMPLES, "no examples found"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    result = subprocess.run([sys.executable, str(path), "--epochs", "2"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert SAYS.get(path.name, "QFX") in result.stdout, result.stdout[-2000:]
