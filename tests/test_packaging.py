"""Packaging as a user meets it: an sdist and a wheel built with pip's defaults (build isolation
on, so no torch at build time) install into a fresh venv and work there, compiling the C++
kernel on first use; an isolated editable install works too; the failure modes of the
first-use build say what to do.

The throwaway venvs see this environment's torch (and other dependencies) through a ``.pth``
line appended *after* their own site-packages, so nothing heavy is installed twice and the
steerkernel under test is the one installed into the venv (asserted).
"""
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PURELIB = sysconfig.get_paths()["purelib"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="venv layout and compiler checks: Linux")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
    return r


def _venv(path):
    """A bare venv that also sees this environment's packages (appended, lowest priority)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    py = path / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(site.stdout.strip(), "zz_outer_env.pth"), "w") as f:
        f.write(PURELIB + "\n")
    return py


def _pip_into(py, *args, cwd=None):
    return _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                 "--disable-pip-version-check", "--no-deps", "--ignore-installed", *args],
                cwd=cwd)


# A junction call on the C++ backend, compared to the float64 oracle, in the venv under test.
CHECK = textwrap.dedent("""
    import json, os, sys, torch, steerkernel
    from steerkernel.backends import backend_status, native
    assert steerkernel.__file__.startswith(sys.prefix), steerkernel.__file__
    torch.manual_seed(0)
    T, d, K = 5, 96, 4
    r = torch.randn(T, d); x = torch.randn(T, d); w = torch.rand(d)
    V = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
    slot = torch.tensor([0, 1, 1, 0, 1], dtype=torch.int32)
    shift = torch.zeros(2, K); shift[1, 0] = 0.5
    res = {}
    for b in ("cpu", "reference"):
        rr = r.clone().double() if b == "reference" else r.clone()
        args = [t.double() if b == "reference" else t for t in (V, x)]
        s, n, o = steerkernel.ops.junction(rr, args[0], x=args[1], slot=slot, shift=shift,
                                           weight=w.double() if b == "reference" else w,
                                           backend=b)
        res[b] = (rr.float(), s.float(), o.float())
    for a, b in zip(res["cpu"], res["reference"]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    print(json.dumps({"native": native.build_status(), "cpu": backend_status()["cpu"]}))
""")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """`python -m build`: the sdist, then the wheel built from it, both with build isolation."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), ROOT])
    return out


def test_sdist_and_wheel_build_isolated_and_run_in_a_fresh_venv(dist, tmp_path):
    sdist = next(dist.glob("steerkernel-*.tar.gz"))
    wheel = next(dist.glob("steerkernel-*.whl"))
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in ("pyproject.toml", "setup.py", "csrc/ops.cpp", "csrc/junction_cpu.cpp",
                 "csrc/junction_cuda.cu", "steerkernel/backends/native_spec.py",
                 "steerkernel/data/emotions.json", "docs/design.md"):
        assert need in names, f"sdist lacks {need}"
    assert not any(n.endswith(".so") for n in names), "sdist carries a built library"
    # built without torch: a pure wheel that carries the sources for the first-use build
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
    assert "steerkernel/_csrc/ops.cpp" in wnames and "steerkernel/_csrc/cpu_vec.h" in wnames
    assert not any(n.endswith(".so") for n in wnames)

    py = _venv(tmp_path / "venv")
    _pip_into(py, str(wheel))
    env = dict(os.environ, STEERKERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("STEERKERNEL_BACKEND", None)
    env.pop("PYTHONPATH", None)
    run = _run([str(py), "-c", CHECK], cwd=str(tmp_path), env=env)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["native"]["_C"]["mode"] == "first-use build", report
    assert report["native"]["_C"]["path"].startswith(str(tmp_path / "cache")), report
    assert report["cpu"][0] is True and "built on first use" in report["cpu"][1]
    assert "compiling the native CPU kernel" in run.stderr  # the progress message
    # second process: loads the cached build, compiles nothing, says nothing
    again = _run([str(py), "-c", CHECK], cwd=str(tmp_path), env=env)
    assert "compiling" not in again.stderr
    # the console script and `doctor --json` report the build mode and exact versions
    doc = _run([str(tmp_path / "venv" / "bin" / "steerkernel"), "doctor", "--json"],
               cwd=str(tmp_path), env=env)
    info = json.loads(doc.stdout)
    assert info["native"]["_C"]["mode"] == "first-use build"
    assert info["packages"]["steerkernel"] and info["packages"]["torch"]


def test_first_use_build_failures_say_what_to_do(dist, tmp_path):
    """No build shipped and no way to make one: the backend is unavailable with the reason,
    the automatic choice falls back to the reference, and forcing 'cpu' is a clear error."""
    py = _venv(tmp_path / "venv")
    _pip_into(py, str(next(dist.glob("*.whl"))))
    script = textwrap.dedent("""
        import torch, steerkernel
        from steerkernel.backends import backend_status, resolve
        ok, why = backend_status()["cpu"]
        print(ok); print(why); print(resolve(torch.device("cpu")))
        try:
            steerkernel.ops.junction(torch.randn(2, 8), torch.eye(8)[:1], backend="cpu")
        except Exception as e:
            print(type(e).__name__, e)
    """)
    base = dict(os.environ, STEERKERNEL_CACHE=str(tmp_path / "empty-cache"))
    base.pop("STEERKERNEL_BACKEND", None)
    for extra, expect in (({"STEERKERNEL_JIT": "0"}, "STEERKERNEL_JIT=0"),
                          ({"CXX": "no-such-compiler-xyz"}, "no C++ compiler")):
        out = _run([str(py), "-c", script], cwd=str(tmp_path), env=dict(base, **extra))
        lines = out.stdout.strip().splitlines()
        assert lines[0] == "False" and expect in lines[1], lines
        assert lines[2] == "reference", lines
        assert lines[3].startswith("BackendUnavailable") and expect in lines[3], lines
    assert not os.path.exists(tmp_path / "empty-cache" / "ext") or not any(
        p.endswith(".so") for _, _, fs in os.walk(tmp_path / "empty-cache") for p in fs)


def test_isolated_editable_install_works(tmp_path):
    """`pip install -e .` with build isolation (no torch in the build env) installs; the
    package then imports from the checkout."""
    py = _venv(tmp_path / "venv")
    _pip_into(py, "-e", ROOT)
    out = _run([str(py), "-c", "import steerkernel, sys; print(steerkernel.__file__)"],
               cwd=str(tmp_path))
    assert out.stdout.strip().startswith(os.path.join(ROOT, "steerkernel"))
