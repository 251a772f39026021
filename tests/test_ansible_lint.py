"""The playbook and roles pass ansible-lint's production profile (no fleet needed)."""

import os
import subprocess
import sys
from pathlib import Path

from helpers import needs

ANSIBLE = Path(__file__).resolve().parents[1] / "ansible"
LINT = Path(sys.executable).parent / "ansible-lint"


@needs(LINT.exists, "ansible-lint is not installed next to this Python (make install)")
def test_ansible_lint_passes(tmp_path):
    env = {**os.environ, "PATH": f"{LINT.parent}{os.pathsep}{os.environ['PATH']}", "ANSIBLE_HOME": str(tmp_path)}
    proc = subprocess.run([str(LINT), "--nocolor"], cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s), 0 warning(s)" in proc.stdout + proc.stderr
