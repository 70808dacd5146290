"""The command line: `python -m fastkd info` and the argument handling of `demo`."""
import subprocess
import sys

import pytest

from fastkd.__main__ import main


def test_info_lists_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "fastkd", "info"], capture_output=True, text=True, check=True).stdout
    assert "fastkd 0.1.0" in out
    assert "torch " in out
    for backend in ("torch", "triton", "cuda"):
        assert f"backend {backend}:" in out


def test_unknown_command_and_backend_are_rejected():
    with pytest.raises(SystemExit):
        main(["train"])
    with pytest.raises(SystemExit):
        main(["demo", "--backend", "fast"])


def test_kernels_command_is_registered(capsys):
    # The compile itself (about a minute per architecture) is tests/test_static_compile.py's.
    with pytest.raises(SystemExit) as exit_:
        main(["kernels", "--help"])
    assert exit_.value.code == 0
    assert "--arch" in capsys.readouterr().out
