"""launch/localize.launch.py and the robot_localization configs, checked without a ROS install.

launch and launch_ros cannot be installed here (see ENVIRONMENT.md): the launch file is parsed,
its node plan is checked against setup.py's installed files and the config files, and it is
run through launch_ros only where that imports.
"""

import ast
import importlib.util
import os
from pathlib import Path
import re
import runpy
import sys

import pytest
import yaml

from geozoom_ros.errors import ConfigError
from geozoom_ros.ros import topics
from geozoom_ros.ros.params import NodeParams

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch' / 'localize.launch.py'
CONFIGS = ('localize.yaml', 'ekf.yaml', 'navsat_transform.yaml')
EXPECTED_ARGS = {'map', 'model', 'image_topic', 'use_ekf', 'retrieval_model', 'params_file',
                 'datum'}
DATUM = '47.3701,8.5402,0.25'


def _launch_module():
    spec = importlib.util.spec_from_file_location('geozoom_localize_launch', LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def setup_kwargs():
    """What setup.py passes to setuptools.setup (data_files, entry points), without installing."""
    import setuptools

    captured = {}
    real = setuptools.setup
    cwd = os.getcwd()
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / 'setup.py'), run_name='__main__')
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    return captured


def _installed(setup_kwargs):
    """Return {install path: source path} of every data file."""
    out = {}
    for dest, files in setup_kwargs['data_files']:
        for f in files:
            out[f'{dest}/{Path(f).name}'] = f
    return out


def test_launch_file_parses_and_names_installed_things(setup_kwargs):
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert {'geozoom_node', 'ekf_node', 'navsat_transform_node'} <= strings
    assert {'localize.yaml', 'ekf.yaml', 'navsat_transform.yaml'} <= strings
    assert any(isinstance(n, ast.FunctionDef) and n.name == 'generate_launch_description'
               for n in tree.body)
    installed = _installed(setup_kwargs)
    assert installed['share/geozoom_ros/launch/localize.launch.py'] == \
        'launch/localize.launch.py'
    for name in CONFIGS:
        assert installed[f'share/geozoom_ros/config/{name}'] == f'config/{name}'
    # launch_ros runs lib/geozoom_ros/geozoom_node: an executable Python launcher.
    script = ROOT / installed['lib/geozoom_ros/geozoom_node']
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith('#!/usr/bin/env python3') and 'geozoom_ros.ros.node' in text
    compile(text, str(script), 'exec')
    scripts = setup_kwargs['entry_points']['console_scripts']
    assert 'geozoom_node = geozoom_ros.ros.node:main' in scripts
    from geozoom_ros.ros.node import main
    assert callable(main)


def test_launch_arguments_are_the_documented_ones():
    module = _launch_module()  # importable without launch: its imports are inside functions
    assert set(module.ARGUMENTS) == EXPECTED_ARGS
    readme = ROOT / 'README.md'
    text = readme.read_text() if readme.exists() else ''
    if 'localize.launch.py' not in text:
        pytest.skip('README.md has no localize.launch.py section yet')
    mentioned = set(re.findall(r'\b([a-z_]+):=', text))
    assert EXPECTED_ARGS <= set(re.findall(r'`([a-z_]+)`', text)) | mentioned, \
        'README must list every launch argument'
    assert mentioned <= EXPECTED_ARGS | set(NodeParams.names()), mentioned - EXPECTED_ARGS


def test_plan_without_ekf_starts_only_the_node(tmp_path):
    plan = _launch_module().plan
    nodes = plan({'map': '/maps/b', 'model': '/models/m', 'image_topic': '/cam/img',
                  'use_ekf': 'false', 'params_file': '', 'datum': ''}, str(ROOT))
    assert len(nodes) == 1
    node = nodes[0]
    assert (node['package'], node['executable'], node['name']) == \
        ('geozoom_ros', 'geozoom_node', 'geozoom_node')
    params_file, overrides = node['parameters']
    assert params_file == str(ROOT / 'config' / 'localize.yaml')
    assert overrides == {'bundle': '/maps/b', 'model': '/models/m', 'image_topic': '/cam/img'}
    with pytest.raises(ConfigError, match='map:='):
        plan({'map': '', 'model': '/m'}, str(ROOT))
    with pytest.raises(ValueError, match='use_ekf'):
        plan({'map': '/b', 'model': '/m', 'use_ekf': 'maybe'}, str(ROOT))
    fused = plan({'map': '/b', 'model': '/m', 'retrieval_model': '/r'}, str(ROOT))
    assert fused[0]['parameters'][1] == {'bundle': '/b', 'model': '/m',
                                         'image_topic': '/camera/image_raw',
                                         'method': 'zoom-fused', 'retrieval_model': '/r'}
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**:\n  ros__parameters:\n    beam_width: 0\n')
    with pytest.raises(ConfigError, match='beam_width=0'):
        plan({'map': '/b', 'model': '/m', 'params_file': str(bad)}, str(ROOT))


def test_plan_with_ekf_wires_fix_gate_and_datum():
    nodes = _launch_module().plan({'map': '/maps/b', 'model': '/models/m', 'image_topic': '',
                                   'use_ekf': 'true', 'params_file': '', 'datum': DATUM},
                                  str(ROOT))
    by_name = {n['name']: n for n in nodes}
    assert set(by_name) == {'geozoom_node', 'ekf_odom', 'ekf_map', 'navsat_transform'}
    assert by_name['ekf_odom']['executable'] == by_name['ekf_map']['executable'] == 'ekf_node'
    assert by_name['navsat_transform']['executable'] == 'navsat_transform_node'
    # geozoom_node and navsat_transform_node get the same datum.
    overrides = by_name['geozoom_node']['parameters'][1]
    assert overrides['datum_source'] == 'parameters'
    assert (overrides['datum_latitude'], overrides['datum_longitude'],
            overrides['datum_yaw']) == (47.3701, 8.5402, 0.25)
    assert overrides['image_topic'] == '/camera/image_raw'
    nav_file, nav_over = by_name['navsat_transform']['parameters']
    assert nav_over == {'wait_for_datum': True, 'datum': [47.3701, 8.5402, 0.25]}
    # The fix reaches ekf_map only through navsat_transform_node, gated there.
    fix_topic = NodeParams().fix_topic
    nav_remap = dict(by_name['navsat_transform']['remappings'])
    assert nav_remap['gps/fix'] == fix_topic == topics.FIX
    assert nav_remap['odometry/gps'] == topics.ODOMETRY_GPS
    assert nav_remap['odometry/filtered'] == topics.ODOMETRY_GLOBAL
    assert dict(by_name['ekf_map']['remappings'])['odometry/filtered'] == \
        topics.ODOMETRY_GLOBAL
    assert dict(by_name['ekf_odom']['remappings'])['odometry/filtered'] == \
        topics.ODOMETRY_LOCAL
    ekf = yaml.safe_load((ROOT / 'config' / 'ekf.yaml').read_text())
    assert by_name['ekf_map']['parameters'] == [str(ROOT / 'config' / 'ekf.yaml')]
    gps_inputs = [k for k, v in ekf['ekf_map']['ros__parameters'].items()
                  if re.fullmatch(r'odom\d+', k) and v == topics.ODOMETRY_GPS]
    assert len(gps_inputs) == 1
    assert not any(v == topics.ODOMETRY_GPS for v in ekf['ekf_odom']['ros__parameters']
                   .values())
    with pytest.raises(ConfigError, match='datum'):
        _launch_module().plan({'map': '/b', 'model': '/m', 'use_ekf': 'true',
                               'datum': '95,8'}, str(ROOT))


def test_ekf_configs_follow_rep105_and_gate_the_fix():
    ekf = yaml.safe_load((ROOT / 'config' / 'ekf.yaml').read_text())
    odom = ekf['ekf_odom']['ros__parameters']
    emap = ekf['ekf_map']['ros__parameters']
    assert odom['world_frame'] == odom['odom_frame'] == 'odom'
    assert emap['world_frame'] == emap['map_frame'] == 'map'
    for p in (odom, emap):
        for key, value in p.items():
            if key.endswith('_config'):
                assert len(value) == 15 and all(isinstance(v, bool) for v in value), key
            if key.endswith('covariance'):
                assert len(value) == 15 and all(isinstance(v, float) and v > 0
                                                for v in value), key
    gps = next(k for k, v in emap.items() if v == topics.ODOMETRY_GPS)
    assert emap[f'{gps}_config'][:2] == [True, True] and not any(emap[f'{gps}_config'][2:])
    threshold = emap[f'{gps}_pose_rejection_threshold']
    assert isinstance(threshold, float) and 0 < threshold < 10
    assert emap[f'{gps}_differential'] is False
    nav = yaml.safe_load((ROOT / 'config' / 'navsat_transform.yaml').read_text())
    nav = nav['navsat_transform']['ros__parameters']
    assert nav['wait_for_datum'] is True and len(nav['datum']) == 3
    assert nav['use_local_cartesian'] is True and nav['zero_altitude'] is True
    assert nav['yaw_offset'] == 0.0 and nav['magnetic_declination_radians'] == 0.0


def _undocumented_keys(path):
    """Return the keys of a YAML file with no comment above them (a group may share one)."""
    lines = path.read_text().splitlines()
    key = re.compile(r'^\s*([A-Za-z_/*][\w/*]*):')
    missing = []
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m or m.group(1) in ('ros__parameters', '/**') or not line.startswith('    '):
            continue
        j = i - 1
        # Walk up over the keys of the same group and list continuation lines.
        while j >= 0 and lines[j].strip() and not lines[j].strip().startswith('#') and \
                (key.match(lines[j]) or lines[j].startswith('     ')):
            j -= 1
        if j < 0 or not lines[j].strip().startswith('#'):
            missing.append(m.group(1))
    return missing


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_field_is_documented(name):
    assert _undocumented_keys(ROOT / 'config' / name) == []


def test_localize_yaml_holds_exactly_the_node_parameters():
    data = yaml.safe_load((ROOT / 'config' / 'localize.yaml').read_text())
    assert set(data['/**']['ros__parameters']) == set(NodeParams.names())


def test_launch_with_launch_ros_when_installed():
    launch = pytest.importorskip(
        'launch_ros', reason='launch_ros is not installable here (ENVIRONMENT.md); the launch '
                             'file is checked statically above')
    del launch
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument

    desc = _launch_module().generate_launch_description()
    assert isinstance(desc, LaunchDescription)
    names = {e.name for e in desc.entities if isinstance(e, DeclareLaunchArgument)}
    assert names == EXPECTED_ARGS
    assert 'launch' in sys.modules
