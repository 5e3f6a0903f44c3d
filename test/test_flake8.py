"""Lint: flake8 with ament's settings (setup.cfg) over the package, tests, launch files."""

from pathlib import Path
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]


def test_flake8():
    targets = [str(ROOT / p) for p in ('geozoom_ros', 'test', 'launch', 'setup.py', 'tools')
               if (ROOT / p).exists()]
    result = subprocess.run([sys.executable, '-m', 'flake8', '--config', str(ROOT / 'setup.cfg'),
                             *targets], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, 'flake8 found problems:\n' + result.stdout + result.stderr
