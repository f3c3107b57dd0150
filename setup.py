"""Only what pyproject.toml cannot say: the package list = every discovered ``diffusion_lab*``
package plus ``diffusion_lab.conf``, i.e. the top-level ``conf/`` shipped inside the package
(``[tool.setuptools.package-dir]`` in pyproject.toml; see diffusion_lab/utils/config_path.py)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["diffusion_lab", "diffusion_lab.*"]), "diffusion_lab.conf"])
