"""The command line: `python -m fastkd info` and the argument handling of `demo`."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(SystemExit):
        main(["demo", "--threads", "0"])


def test_kernels_command_is_registered(capsys):
    # The compile itself (about a minute per architecture) is tests/test_static_compile.py's.
    with pytest.raises(SystemExit) as exit_:
        main(["kernels", "--help"])
    assert exit_.value.code == 0
    assert "--arch" in capsys.readouterr().out


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_info_with_an_invalid_backend_variable_says_so():
    """FASTKD_BACKEND=foo: info still prints everything, with one line naming the variable, its value and the
    allowed values, and no traceback."""
    done = run_cli("info", env={"FASTKD_BACKEND": "foo"})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("default backend:"))
    assert "FASTKD_BACKEND='foo' is invalid" in line and "auto, torch, triton, cuda" in line
    for backend in ("torch", "triton", "cuda"):
        assert f"backend {backend}:" in done.stdout
    assert "CUDA extension:" in done.stdout


def test_demo_with_an_invalid_backend_variable_stops_with_the_reason(monkeypatch, capsys):
    monkeypatch.setenv("FASTKD_BACKEND", "foo")
    assert main(["demo", "--quick"]) == 2
    assert "FASTKD_BACKEND='foo' is invalid" in capsys.readouterr().err


def test_build_directory_is_torchs(monkeypatch, tmp_path):
    """The just-in-time build's folder, computed without creating it, is the one torch compiles into."""
    import torch._appdirs
    from torch.utils import cpp_extension

    from fastkd.cuda import build
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(torch._appdirs, "user_cache_dir", lambda appname: str(tmp_path / appname))
    assert build.build_directory() == Path(cpp_extension._get_build_directory(build.NAME, False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert build.build_directory() == Path(cpp_extension._get_build_directory(build.NAME, False))
    assert build.library_path() == tmp_path / "ext" / build.NAME / f"{build.NAME}.so"


def test_info_finds_a_just_in_time_build(monkeypatch, tmp_path):
    """`python -m fastkd build-cuda` leaves the library in torch's extension cache, not as fastkd._C: info looks
    there too (the cause of "not built" right after build-cuda). A stand-in file that is no library shows the
    lookup without a compiler; one older than csrc/ counts as stale."""
    import fastkd.__main__ as cli
    from fastkd.cuda import build
    if importlib.util.find_spec("fastkd._C") is not None:
        pytest.skip("an ahead-of-time build (fastkd._C) is installed: info reports that one")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cli.cuda_extension_status().startswith("not built;")

    library = build.library_path()
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    assert build.cached_library() == library
    status = cli.cuda_extension_status()
    assert status.startswith(f"built just in time at {library}") and "does not load here" in status

    old = min(p.stat().st_mtime for p in build.CSRC.rglob("*") if p.is_file()) - 10
    os.utime(library, (old, old))
    assert build.cached_library() is None
    assert "older than the sources" in cli.cuda_extension_status()
