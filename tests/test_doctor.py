"""`python -m diffusion_lab.doctor` finds the clash that breaks `import diffusers`."""

import os
import subprocess
import sys


def _doctor(env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "diffusion_lab.doctor"], capture_output=True, text=True, timeout=300, env=env)


def test_doctor_passes_here():
    res = _doctor()
    assert res.returncode == 0, res.stdout
    assert "diffusers" in res.stdout and "FAIL" not in res.stdout


def test_doctor_names_a_broken_torchvision(tmp_path):
    # A torchvision built for another torch: installed (has metadata) but fails on import,
    # exactly like PyPI's torchvision beside a CPU torch build.
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    meta = tmp_path / "torchvision-0.99.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    res = _doctor({"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1
    assert "torchvision 0.99.0 is installed but does not import" in res.stdout
    assert "pip uninstall -y torchvision" in res.stdout
