"""Shared pytest set-up: offline HF, Triton's CPU interpreter when there is no GPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

if not torch.cuda.is_available():
    # must happen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from steerkernel import backends  # noqa: E402


def native_backends():
    """Backends that run at full speed on this machine's tensors: (name, device)."""
    out = []
    status = backends.backend_status()
    if status["cpu"][0]:
        out.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        if status["cuda"][0]:
            out.append(("cuda", "cuda"))
        if status["triton"][0]:
            out.append(("triton", "cuda"))
    return out


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests pick backends explicitly; a developer's STEERKERNEL_BACKEND must not leak in."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture
def memory_capped():
    """The test runs with the process's address space capped at its size now plus 2 GiB, so an
    unbounded allocation fails that test with a MemoryError instead of the kernel's OOM killer
    taking the whole test run down (it did twice in CI: a GGUF string value flipped into an
    array of ~2^60 items; a layer range 0-1e12 expanded into a set).  Linux only."""
    import resource

    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + (2 << 30)
    if hard != resource.RLIM_INFINITY and cap > hard:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
