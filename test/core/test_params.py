"""geozoom_node's parameters: one dataclass, strict keys and types, one-line errors (no ROS)."""

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.ros import params as P
from geozoom_ros.ros.params import load_yaml, NodeParams, parse_datum

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'config' / 'localize.yaml'


def _good(**kw):
    return {'bundle': '/maps/b', 'model': '/models/m', **kw}


def test_params_module_imports_no_ros():
    src = (ROOT / 'geozoom_ros' / 'ros' / 'params.py').read_text()
    top = [line for line in src.splitlines() if line.startswith(('import ', 'from '))]
    assert not any('rclpy' in line or 'rcl_interfaces' in line for line in top)


def test_every_field_is_documented_with_a_valid_default():
    defaults = NodeParams()
    for f in fields(NodeParams):
        meta = f.metadata
        assert meta['description'], f.name
        value = getattr(defaults, f.name)
        assert type(value) in (str, int, float, bool), f.name
        if meta['choices']:
            assert value in meta['choices'], f.name
    defaults.validate(require_paths=False)
    with pytest.raises(ConfigError, match='bundle is not set'):
        defaults.validate()


def test_the_shipped_yaml_is_the_defaults():
    assert load_yaml(CONFIG, require_paths=False) == NodeParams()
    data = yaml.safe_load(CONFIG.read_text())['/**']['ros__parameters']
    assert list(data) == NodeParams.names()  # same keys, same order as the dataclass


@pytest.mark.parametrize('changes, match', [
    ({'beam_widht': 4}, 'unknown parameter.*beam_widht'),
    ({'beam_width': 0}, 'beam_width=0 must be >= 1'),
    ({'beam_width': 2.5}, 'beam_width must be an integer'),
    ({'beam_width': True}, 'beam_width must be an integer'),
    ({'max_rate_hz': 0.0}, 'max_rate_hz=0.0 must be > 0'),
    ({'max_rate_hz': float('inf')}, 'max_rate_hz=inf must be a finite number'),
    ({'min_confidence': 1.5}, 'min_confidence=1.5 must be <= 1.0'),
    ({'max_sigma_m': '100'}, 'max_sigma_m must be a number'),
    ({'image_transport': 'theora'}, "image_transport='theora' is not one of raw, compressed"),
    ({'prior_source': 'gps'}, 'prior_source.*odometry, navsatfix'),
    ({'heading_source': 'compass'}, 'heading_source'),
    ({'pose_frame': 'ecef'}, 'pose_frame'),
    ({'datum_latitude': 91.0}, 'datum_latitude=91.0 must be <= 85.0'),
    ({'fix_service': 16}, 'fix_service=16 must be <= 15'),
    ({'image_topic': ' '}, 'image_topic is empty'),
    ({'prior_source': 'odometry', 'prior_topic': ''}, 'prior_topic is empty'),
    ({'model': ''}, 'model is not set'),
    ({'method': 'zoom-fused'}, 'retrieval_model is not set but method is zoom-fused'),
    ({'zoom_weight': -0.5}, 'zoom_weight=-0.5 must be >= 0.0'),
])
def test_bad_values_are_one_line_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match) as exc:
        NodeParams.from_dict(_good(**changes), where='test')
    assert '\n' not in str(exc.value) and str(exc.value).startswith('test: ')


def test_numbers_and_reserved_ros_parameters():
    p = NodeParams.from_dict(_good(max_rate_hz=5, use_sim_time=True))
    assert p.max_rate_hz == 5.0 and isinstance(p.max_rate_hz, float)
    assert p.replace(beam_width=3).beam_width == 3
    with pytest.raises(ConfigError):
        p.replace(beam_width=-1)


def test_yaml_files_ros_layout_node_sections_and_errors(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('geozoom_node:\n  ros__parameters:\n    bundle: /b\n    model: /m\n'
                 '    beam_width: 3\nother_node:\n  ros__parameters:\n    nonsense: 1\n')
    p = load_yaml(f)
    assert (p.bundle, p.model, p.beam_width) == ('/b', '/m', 3)
    f.write_text('bundle: /b\nmodel: /m\nmethod: zoom\n')  # a plain mapping
    assert load_yaml(f).method == 'zoom'
    f.write_text('other_node:\n  ros__parameters:\n    a: 1\n')
    with pytest.raises(ConfigError, match='no section for geozoom_node'):
        load_yaml(f)
    f.write_text('/**:\n  ros__parameters:\n    bundle: [unclosed\n')
    with pytest.raises(ConfigError, match='not valid YAML at line'):
        load_yaml(f)
    with pytest.raises(InputError, match='does not exist|No such file'):
        load_yaml(tmp_path / 'missing.yaml')


def test_check_files_names_the_missing_path(tmp_path):
    p = NodeParams.from_dict(_good(bundle=str(tmp_path / 'nowhere')))
    with pytest.raises(InputError, match='bundle .*nowhere does not exist'):
        p.validate(check_files=True)
    (tmp_path / 'b').mkdir()
    (tmp_path / 'm').mkdir()
    p = NodeParams.from_dict(_good(bundle=str(tmp_path / 'b'), model=str(tmp_path / 'm'),
                                   method='zoom-fused', retrieval_model=str(tmp_path / 'r')))
    with pytest.raises(InputError, match='retrieval_model .*r does not exist'):
        p.validate(check_files=True)


def test_datum_text():
    assert parse_datum('47.37,8.54') == (47.37, 8.54, 0.0)
    assert parse_datum('47.37, 8.54, 0.5') == (47.37, 8.54, 0.5)
    for bad in ('47.37', 'a,b', '91,8', '47,8,1,2', 'nan,8'):
        with pytest.raises(ConfigError, match='datum'):
            parse_datum(bad)


def test_descriptor_metadata_covers_choices_and_ranges():
    meta = NodeParams.describe('image_transport')
    assert meta['choices'] == P.TRANSPORTS
    meta = NodeParams.describe('beam_width')
    assert (meta['low'], meta['high']) == (1, 256)
    with pytest.raises(ConfigError, match='unknown'):
        NodeParams.describe('nope')
