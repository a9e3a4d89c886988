"""Packaging for edge-agent (device daemon) and edge-fleet (cloud side).

The base install is what the daemon needs on a device. Training (scikit-learn,
TensorFlow) lives in the ``train`` extra so a Pi never has to carry it.
"""
from setuptools import find_packages, setup

# tflite-runtime 2.14.0 is the last release: wheels for CPython 3.11 on x86_64,
# aarch64 and armv7l, built against numpy 1.x.  Elsewhere ai-edge-litert
# (numpy 2 friendly, no armv7l wheel) provides the same Interpreter API.
_TFLITE_WHEEL = (
    'python_version < "3.12" and (platform_machine == "x86_64" or '
    'platform_machine == "aarch64" or platform_machine == "armv7l")'
)
_NO_TFLITE_WHEEL = (
    'python_version >= "3.12" or (platform_machine != "x86_64" and '
    'platform_machine != "aarch64" and platform_machine != "armv7l")'
)

setup(
    name="edge-agent",
    version="0.1.0",
    description="On-device anomaly detection and forecasting for digital-twin IoT fleets",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["agent", "agent.*", "common", "common.*", "models", "models.*", "fleet", "fleet.*"]),
    package_data={"agent": ["*.toml", "static/*", "static/vendor/*"], "fleet": ["*.toml", "static/*"]},
    install_requires=[
        "numpy>=1.24",
        "psutil>=5.9",
        "paho-mqtt>=2.0,<3",
        "cryptography>=41",
        "sqlite-utils>=3.30",     # one-shot commands (export) and `sqlite-utils` to inspect the buffer
    ],
    extras_require={
        "edge": [
            f"tflite-runtime==2.14.0; {_TFLITE_WHEEL}",
            f"numpy<2; {_TFLITE_WHEEL}",
            f"ai-edge-litert; {_NO_TFLITE_WHEEL}",
        ],
        "train": [
            "scikit-learn>=1.3",
            'tensorflow-cpu==2.21.0; platform_machine == "x86_64"',
            'tensorflow==2.21.0; platform_machine != "x86_64"',
        ],
        "fleet": [
            "psycopg[binary]>=3.1",   # only for a postgresql:// fleet store; SQLite needs nothing
        ],
        "test": [
            "psycopg[binary]>=3.1",
            "pytest>=7",
            "pytest-timeout>=2",
            "prometheus-client>=0.17",
        ],
    },
    entry_points={
        "console_scripts": [
            "edge-agent=agent.cli:main",
            "edge-fleet=fleet.cli:main",
        ]
    },
)
