"""Lint: docstring style (pep257 conventions, as ament_pep257 checks them)."""

from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def test_pep257():
    result = subprocess.run([sys.executable, '-m', 'pydocstyle', '--config',
                             str(ROOT / 'setup.cfg'), str(ROOT / 'geozoom_ros'),
                             str(ROOT / 'test')], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, 'pydocstyle found problems:\n' + result.stdout + result.stderr
