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


def test_doctor_checks_that_the_hub_answers_and_says_how_to_go_offline(monkeypatch):
    """#29 item 10: with no network the doctor said "Hugging Face hub: online" (it read only
    HF_HUB_OFFLINE), and every hub access then retried for ~30 s."""
    import socket
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from diffusion_lab.utils import doctor

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    # nothing listens: unreachable, with how to go offline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    status, what, advice = doctor.hub_row()
    assert status == "warn" and what.startswith(f"Hugging Face hub: unreachable ({closed}:") and "online" not in what
    assert "export HF_HUB_OFFLINE=1" in advice
    # a server that accepts but never answers: bounded by the short timeout, not the hub client's retries
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    start = time.monotonic()
    assert doctor.hub_row()[0] == "warn"
    assert time.monotonic() - start < doctor.HUB_TIMEOUT_S + 2
    silent.close()

    # a server that answers (any status): online
    class Answer(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert doctor.hub_row()[:2] == ("ok", f"Hugging Face hub: online (http://127.0.0.1:{server.server_port} reachable); cache "
                                             f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}")
    finally:
        server.shutdown()
    # offline by the environment: no check at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed)
    assert doctor.hub_row()[1].startswith("Hugging Face hub: offline (HF_HUB_OFFLINE=1)")
