"""Every Python block of the README runs as written (in a fresh interpreter, in an empty directory), so
the documented API cannot drift from the code."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)), ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_readme_python_block_runs(i, tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCKS[i]], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n{r.stderr[-3000:]}"
