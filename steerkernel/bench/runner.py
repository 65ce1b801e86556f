"""The benchmark runner behind ``python -m benchmarks`` and ``steerkernel bench``.

One run: measure copy bandwidth, then for every registered case time every implementation side
by side (same inputs, same run), check each result against the float64 reference first, and
write one JSON file (rewritten after every case, so a run cut short still leaves its results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import List, Optional

import torch

from ..testing import Tol, assert_close
from . import cases as C
from .roofline import copy_bandwidth, gbps
from .schema import RESULTS_DIR
from .timing import rotating, time_cpu, time_cuda

SCHEMA_VERSION = 1

#: Timer settings per size: CPU (seconds) and CUDA (milliseconds).
CPU_TIMER = {"smoke": dict(warmup_s=0.001, budget_s=0.003, min_samples=3, min_sample_s=2e-5),
             "quick": dict(warmup_s=0.05, budget_s=0.3),
             "full": dict(warmup_s=0.1, budget_s=1.0)}
CUDA_TIMER = {"smoke": dict(warmup_ms=1, rep_ms=2, min_samples=3),
              "quick": dict(warmup_ms=25, rep_ms=100),
              "full": dict(warmup_ms=25, rep_ms=300)}
#: Sanity tolerance of every impl against the float64 reference (catches a wrong baseline;
#: the kernels' real accuracy contract lives in tests/).
CHECK_TOL = {torch.float32: Tol(rtol=1e-3, atol=1e-3), torch.bfloat16: Tol(rtol=5e-2, atol=5e-2),
             torch.float16: Tol(rtol=1e-2, atol=1e-2)}
GRAPH_MAX_T = 64  # CUDA-graph replay at decode sizes (T <= this)
#: CPU allocator set-up for the run.  Eager and compiled torch allocate fresh outputs on every
#: call; with the default glibc + 4 KiB pages a fresh 32 MiB tensor costs ~8k page faults
#: (~15 ms here, 5x the copy itself), which would be measured as "unfused chain" time.  Huge
#: pages for large tensors (c10's THP_MEM_ALLOC_ENABLE) and heap reuse instead of mmap/munmap
#: per allocation (glibc tunables) take that OS cost out, as a caching allocator does on GPU.
#: Read at process start, so the command-line entry points re-exec once with them set.
ALLOC_ENV = {"THP_MEM_ALLOC_ENABLE": "1",
             "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"}


# ----------------------------------------------------------------------------- machine

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def llc_bytes() -> int:
    """Largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for idx in (os.listdir(base) if os.path.isdir(base) else []):
        s = _read(os.path.join(base, idx, "size")).strip()
        m = re.match(r"(\d+)([KMG]?)", s)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20,
                                                 "G": 1 << 30}[m.group(2)])
    return best or (32 << 20)


def machine_info(device: str) -> dict:
    m = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.M)
    info = {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "llc_bytes": llc_bytes(),
            "memory_gib": round(int(m.group(1)) / 2**20, 1) if m else None,
            "os": platform.platform(), "gpu": None, "gpu_count": 0}
    from ..backends import native

    try:
        info["cpu_kernel_simd"] = native.load("_C").simd_description()
    except native.NativeUnavailable:
        info["cpu_kernel_simd"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_l2_bytes=getattr(p, "L2_cache_size", None),
                    gpu_capability=f"{p.major}.{p.minor}")
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for pkg in ("triton", "transformers", "vllm", "numpy", "steerkernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        out["gcc"] = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["gcc"] = None
    return out


def git_revision() -> dict:
    rev = os.environ.get("STEERKERNEL_GIT_REV")
    if rev:
        return {"revision": rev, "dirty": None}

    def git(*a):
        return subprocess.run(["git", "-C", C.REPO_ROOT, *a], capture_output=True, text=True,
                              timeout=10)
    try:
        r = git("rev-parse", "HEAD")
        if r.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"revision": r.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "machine"


# ----------------------------------------------------------------------------- one case

class Runner:
    def __init__(self, device: str, size: str, *, compile: bool = True,
                 compile_budget_s: Optional[float] = None, impls: Optional[List[str]] = None,
                 deadline: Optional[float] = None, log=print):
        self.device, self.size, self.compile = device, size, compile
        self.compile_budget_s = compile_budget_s
        self.compile_spent_s = 0.0
        self.impl_filter = impls
        self.deadline = deadline
        self.log = log
        self.copy_gbps = None
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.cache = getattr(props, "L2_cache_size", 0) or (50 << 20)
            self.max_sets, self.mem_cap = 256, 4 << 30
        else:
            self.cache = llc_bytes()
            self.max_sets, self.mem_cap = (2 if size == "smoke" else 2048), 1 << 30

    def timer(self, fn, graph_calls: int = 0):
        if self.device == "cuda":
            return time_cuda(fn, graph_calls=graph_calls, **CUDA_TIMER[self.size])
        return time_cpu(fn, **CPU_TIMER[self.size])

    def measure_copy_bandwidth(self) -> dict:
        nbytes = (1 << 20) if self.size == "smoke" else None
        return copy_bandwidth(self.device, self.timer, nbytes)

    def run_case(self, case) -> List[dict]:
        base = dict(case=case.name, family=case.family, params=case.params())
        if isinstance(case, C.Unavailable):
            return [dict(base, impl="-", role="-", status="skipped", reason=case.reason)]
        if self.deadline is not None and time.time() > self.deadline:
            return [dict(base, impl="-", role="-", status="skipped",
                         reason="run time budget (--time-budget) spent")]
        if isinstance(case, C.HFDecodeCase):
            try:
                return case.run(torch.get_num_threads())
            except (Exception, SystemExit) as e:  # e.g. the model is not installed here
                return [dict(base, impl="-", role="-", status="error",
                             reason=f"{type(e).__name__}: {e}"[:500])]
        over = self.compile_budget_s is not None and self.compile_spent_s > self.compile_budget_s
        impls = C.junction_impls(case, self.device, compile=self.compile)
        if self.impl_filter:
            impls = [i for i in impls if i.name in self.impl_filter]
        work = C.case_work(case, self.device)
        nsets = C.num_sets(work.bytes, self.cache, max_sets=self.max_sets, mem_cap=self.mem_cap)
        sets = C.input_sets(case, self.device, nsets)
        pristine = C.clone_set(sets[0])  # the fused op mutates the sets while it is timed
        expected = self.reference(pristine)
        dtype = C.DTYPES[case.dtype]
        records = []
        for impl in impls:
            rec = dict(base, impl=impl.name, role=impl.role, bytes=impl.work.bytes,
                       flops=impl.work.flops, sets=nsets)
            if impl.compile_key is not None and over and impl.compile_key not in _WARM:
                records.append(dict(rec, status="skipped", reason="compile budget spent"))
                continue
            try:
                records.append(self.measure(impl, sets, pristine, expected, dtype, case, rec))
            except Exception as e:  # one failing impl must not sink the run
                records.append(dict(rec, status="error", reason=f"{type(e).__name__}: {e}"[:500]))
            if self.device == "cuda":
                torch.cuda.synchronize()
        return records

    def reference(self, s: dict) -> dict:
        from ..ops.junction import junction

        kw = C.clone_set(s)
        scores, norms, out = junction(**kw, eps=C.EPS, backend="reference")
        return dict(residual=kw["residual"], scores=scores, norms=norms, out=out)

    def measure(self, impl: C.Impl, sets, pristine, expected, dtype, case, rec) -> dict:
        # 1. check (and compile, timed) on a private copy of the first input set
        args = impl.prepare(C.clone_set(pristine))
        t0 = time.perf_counter()
        ret = impl.call(args)
        if self.device == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        if impl.compile_key is not None:
            cached = impl.compile_key in _WARM
            _WARM.add(impl.compile_key)
            rec["compile_s"] = None if cached else round(first_s, 3)
            if not cached:
                self.compile_spent_s += first_s
        if impl.outputs is not None:
            got = impl.outputs(args, ret)
            tol = CHECK_TOL[dtype]
            for k in ("scores", "norms", "residual", "out"):
                if expected.get(k) is not None:
                    assert_close(got[k], expected[k], tol, f"{impl.name} {k}")
            rec["checked"] = True
        else:
            rec["checked"] = False
        # 2. time it, rotating over the input sets
        arg_sets = [impl.prepare(s) for s in sets]
        fn = rotating(impl.call, arg_sets)
        graph = 0
        if self.device == "cuda" and case.T <= GRAPH_MAX_T:
            graph = len(arg_sets) * -(-32 // len(arg_sets))
        try:
            t = self.timer(fn, graph)
        except RuntimeError as e:
            if not graph:
                raise
            rec["graph_error"] = str(e)[:300]
            graph = 0
            t = self.timer(fn)
        rec.update(status="ok", graph=bool(graph), **t.as_dict())
        rec["gbps"] = gbps(impl.work.bytes, t.median_s)
        rec["gflops"] = impl.work.flops / t.median_s / 1e9
        rec["tokens_per_s"] = case.T / t.median_s
        rec["frac_copy_bw"] = rec["gbps"] / self.copy_gbps if self.copy_gbps else None
        return rec


_WARM: set = set()  # compile keys whose compiled function has run once in this process


# ----------------------------------------------------------------------------- whole run

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--size", choices=("smoke", "quick", "full"), default="full",
                   help="case set: smoke (tiny, seconds), quick (minutes), full (default)")
    p.add_argument("--quick", dest="size", action="store_const", const="quick",
                   help="same as --size quick")
    p.add_argument("--out", default=None, help=f"result directory (default {RESULTS_DIR})")
    p.add_argument("--name", default=None, help="result file name (default: derived)")
    p.add_argument("--filter", action="append", default=[], metavar="REGEX",
                   help="only cases whose name matches REGEX (repeatable: any matches)")
    p.add_argument("--impls", default=None,
                   help="comma-separated impls to run (default all), e.g. fused_cpu,chain_eager")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--compile-budget", type=float, default=None, metavar="S",
                   help="stop compiling new chain/floor shapes after S seconds of compilation")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds (the rest is recorded as skipped)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, normally all cores)")
    p.add_argument("--system-allocator", action="store_true",
                   help="keep the default CPU allocator set-up (see runner.ALLOC_ENV)")
    p.add_argument("--label", default=None, help="free-text label stored in the result")
    p.add_argument("--note", action="append", default=[], help="note stored in the result")
    p.add_argument("--no-report", action="store_true",
                   help="do not render the Markdown table and plot after the run")


def default_name(device: str, size: str, info: dict) -> str:
    who = info["gpu"] if device == "cuda" else f"{info['cpu_model']}-{info['cores']}c"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M")
    return f"{device}-{size}-{slug(who)}-{stamp}.json"


def write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(rec: dict) -> dict:
    """JSON has no NaN/Inf: store them as null."""
    return {k: (None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf")))
                else v) for k, v in rec.items()}


#: every implementation name the junction cases can time (``--impls`` picks among them)
KNOWN_IMPLS = ("fused_cpu", "fused_cuda", "fused_triton", "chain_eager", "chain_compiled",
               "addnorm_eager", "addnorm_compiled", "vllm_fused_add_rms_norm")


def run(args) -> int:
    start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("steerkernel bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    for f in args.filter or ():
        try:
            re.compile(f)
        except re.error as e:
            print(f"steerkernel bench: --filter {f!r} is not a valid regular expression: {e}",
                  file=sys.stderr)
            return 2
    if args.impls:
        unknown = sorted(set(args.impls.split(",")) - set(KNOWN_IMPLS))
        if unknown:
            print(f"steerkernel bench: --impls: unknown {', '.join(map(repr, unknown))}; known: "
                  f"{', '.join(KNOWN_IMPLS)}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    info = machine_info(device)
    path = os.path.join(out_dir, args.name or default_name(device, args.size, info))
    cases = C.all_cases(device, args.size)
    if args.filter:
        cases = [c for c in cases if any(re.search(f, c.name) for f in args.filter)]
    deadline = start + args.time_budget if args.time_budget else None
    runner = Runner(device, args.size, compile=not args.no_compile,
                    compile_budget_s=args.compile_budget,
                    impls=args.impls.split(",") if args.impls else None, deadline=deadline)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "label": args.label or f"{device} {args.size} on {info['gpu'] or info['cpu_model']}",
        "notes": list(args.note),
        "device": device,
        "size": args.size,
        "machine": info,
        "versions": versions(),
        "git": git_revision(),
        "settings": {"timer": CPU_TIMER[args.size] if device == "cpu" else CUDA_TIMER[args.size],
                     "compile": not args.no_compile, "compile_budget_s": args.compile_budget,
                     "cache_bytes": runner.cache, "graph_max_T": GRAPH_MAX_T,
                     "check_tol": {str(k)[6:]: [v.rtol, v.atol] for k, v in CHECK_TOL.items()},
                     "filters": args.filter, "impls": args.impls,
                     "allocator_env": {k: os.environ.get(k) for k in ALLOC_ENV},
                     "torch_threads": torch.get_num_threads()},
        "copy_bandwidth": {},
        "results": [],
        "elapsed_s": 0.0,
        "complete": False,
    }
    print(f"steerkernel bench: {len(cases)} cases on {device} ({doc['label']}) -> {path}")
    bw = runner.measure_copy_bandwidth()
    runner.copy_gbps = bw["gbps"]
    doc["copy_bandwidth"] = {"start": _finite(bw), "gbps": bw["gbps"]}
    print(f"copy bandwidth: {bw['gbps']:.1f} GB/s (dst.copy_(src), {bw['buffer_bytes'] >> 20} MiB)")
    write_json(path, doc)
    for i, case in enumerate(cases):
        recs = runner.run_case(case)
        doc["results"].extend(_finite(r) for r in recs)
        doc["elapsed_s"] = round(time.time() - start, 1)
        write_json(path, doc)
        print(f"[{i + 1}/{len(cases)}] {case.name}")
        for r in recs:
            print("    " + describe(r))
    bw2 = runner.measure_copy_bandwidth()
    # the copy bandwidth reference is the best of the two measurements (conservative fractions)
    best = max(bw["gbps"], bw2["gbps"])
    doc["copy_bandwidth"].update(end=_finite(bw2), gbps=best)
    for r in doc["results"]:
        if r.get("gbps") is not None:
            r["frac_copy_bw"] = r["gbps"] / best
    doc["elapsed_s"] = round(time.time() - start, 1)
    doc["complete"] = True
    write_json(path, doc)
    problems = validate_file(path)
    if problems:
        print("result does not match benchmarks/results/schema.json:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    print(f"wrote {path} ({doc['elapsed_s']:.0f} s)")
    if not args.no_report:
        from .report import load, markdown, render_files

        render_files([path], out_dir=out_dir, readme=None)
        print(markdown(load(path)))
    n_err = sum(r["status"] == "error" for r in doc["results"])
    return 1 if n_err else 0


def describe(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['impl']:<24} {r['status']}: {r.get('reason', '')}"
    if r.get("gbps") is None:  # end-to-end: per-step times
        rat = f"  {r['ratio_to_stock']:.3f}x stock" if r.get("ratio_to_stock") else ""
        return (f"{r['impl']:<24} {r['median_s'] * 1e3:10.3f} ms [{r['p10_s'] * 1e3:.3f}, "
                f"{r['p90_s'] * 1e3:.3f}]  {r['tokens_per_s']:.1f} tokens/s{rat}")
    comp = f"  (compile {r['compile_s']:.1f} s)" if r.get("compile_s") else ""
    frac = f"{100 * r['frac_copy_bw']:5.1f}% copy BW" if r.get("frac_copy_bw") else ""
    return (f"{r['impl']:<24} {r['median_s'] * 1e6:10.1f} us  [{r['p10_s'] * 1e6:.1f}, "
            f"{r['p90_s'] * 1e6:.1f}]  {r['gbps']:7.1f} GB/s {frac}{comp}")


def validate_file(path: str) -> List[str]:
    from .schema import load_schema, validate

    schema = load_schema()
    if schema is None:
        return []
    with open(path) as f:
        return validate(json.load(f), schema)


def reexec_with_allocator_env(argv: List[str]) -> None:
    """Re-run this process (same command line) with :data:`ALLOC_ENV` unless it is already set
    or ``--system-allocator`` was given.  Only for real command-line invocations."""
    if "--system-allocator" in argv or all(k in os.environ for k in ALLOC_ENV):
        return
    env = dict(os.environ)
    for k, v in ALLOC_ENV.items():
        env.setdefault(k, v)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
