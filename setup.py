"""Install geozoom_ros as an ament_python package (pip or colcon)."""

from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'geozoom_ros'


def _files(pattern):
    return sorted(p for p in glob(pattern) if os.path.isfile(p))


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    package_data={PACKAGE: ['assets/model/*.json', 'assets/model/*.safetensors',
                            'assets/retrieval/*.json', 'assets/retrieval/*.safetensors']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', _files('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', _files('config/*.yaml')),
        ('share/' + PACKAGE + '/config/train', _files('config/train/*.yaml')),
        ('share/' + PACKAGE + '/maps', _files('maps/*')),
        # launch_ros runs lib/<package>/<executable>; pip ignores setup.cfg's install_scripts.
        ('lib/' + PACKAGE, ['scripts/geozoom_node']),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='geozoom_ros maintainers',
    maintainer_email='maintainers@geozoom.dev',
    description='Visual geo-localization by a learned zoom policy over an offline tile pyramid.',
    license='Apache-2.0',
    python_requires='>=3.10',
    entry_points={
        'console_scripts': [
            'geozoom = geozoom_ros.cli:main',
            'geozoom_node = geozoom_ros.ros.node:main',
        ],
    },
)
