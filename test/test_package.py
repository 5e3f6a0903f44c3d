"""The package as ROS installs it: package.xml, installed data files, a torch-free core."""

import os
from pathlib import Path
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import geozoom_ros

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = ['geozoom_ros.geo', 'geozoom_ros.errors', 'geozoom_ros.cli',
                'geozoom_ros.tiles.store', 'geozoom_ros.tiles.views', 'geozoom_ros.tiles.build',
                'geozoom_ros.bundle', 'geozoom_ros.search', 'geozoom_ros.localizer',
                'geozoom_ros.eval.metrics', 'geozoom_ros.world.city']


def test_package_xml_is_format3_with_ros_dependencies():
    root = ET.parse(ROOT / 'package.xml').getroot()
    assert root.tag == 'package' and root.get('format') == '3'
    assert root.findtext('name') == 'geozoom_ros'
    assert root.findtext('license') == 'Apache-2.0'
    assert root.find('export/build_type').text == 'ament_python'
    exec_deps = {e.text for e in root.findall('exec_depend')}
    for dep in ('rclpy', 'sensor_msgs', 'geometry_msgs', 'nav_msgs', 'diagnostic_msgs',
                'cv_bridge'):
        assert dep in exec_deps, dep
    assert root.findtext('version') == geozoom_ros.__version__


def test_core_modules_import_neither_torch_nor_rclpy():
    present = [m for m in CORE_MODULES
               if (ROOT / (m.replace('.', '/') + '.py')).exists()]
    code = ('import importlib, sys\n'
            f'for m in {present!r}: importlib.import_module(m)\n'
            "bad = [m for m in ('torch', 'rclpy', 'moderngl') if m in sys.modules]\n"
            'print(",".join(bad))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == '', f'core modules pulled in: {out.stdout.strip()}'


def test_cli_help_lists_commands_without_heavy_imports():
    code = ('import sys\nfrom geozoom_ros.cli import build_parser\n'
            'build_parser().format_help()\n'
            "print(','.join(m for m in ('torch', 'rclpy', 'rasterio', 'moderngl') "
            'if m in sys.modules))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ''


def _installed_prefix():
    pkg_dir = Path(geozoom_ros.__file__).resolve().parent
    if 'site-packages' not in pkg_dir.parts:
        return None
    return Path(sys.prefix)


def test_installed_data_files_and_ament_index():
    prefix = _installed_prefix()
    if prefix is None:
        pytest.skip('geozoom_ros runs from the source tree; install it (tools/dev.sh) to check '
                    'the installed data files')
    assert (prefix / 'share/ament_index/resource_index/packages/geozoom_ros').is_file()
    share = prefix / 'share/geozoom_ros'
    assert (share / 'package.xml').is_file()
    for rel in ('launch', 'config'):
        src = sorted(p.name for p in (ROOT / rel).glob('*') if p.is_file())
        dst = sorted(p.name for p in (share / rel).glob('*') if p.is_file())
        assert src == dst, rel
    os.environ.setdefault('AMENT_PREFIX_PATH', str(prefix))
    from ament_index_python.packages import get_package_share_directory
    assert Path(get_package_share_directory('geozoom_ros')) == share
