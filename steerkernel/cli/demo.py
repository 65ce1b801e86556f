"""``steerkernel demo``: a first look at the fused junction op on this machine."""
from __future__ import annotations

import time


def add_arguments(p) -> None:
    p.add_argument("--backend", default=None, help="force a backend (default: automatic)")


def run(args) -> int:
    import torch

    from ..ops import junction
    from .. import backends

    torch.manual_seed(0)
    T, d, K = 4, 576, 3
    names = ["calm", "desperate", "afraid"]
    residual, x = torch.randn(T, d), torch.randn(T, d)
    V = torch.nn.functional.normalize(torch.randn(K, d), dim=1)
    # slot 1: add 2.0 along "calm"; slot 2: ablate "desperate"; slot 3: cap "afraid" at 0.5
    shift, lo, hi = torch.zeros(4, K), torch.full((4, K), -torch.inf), torch.full((4, K), torch.inf)
    shift[1, 0] = 2.0
    lo[2, 1] = hi[2, 1] = 0.0
    hi[3, 2] = 0.5
    slot = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    name = backends.resolve(residual.device, args.backend)
    before = (residual + x) @ V.T
    scores, norms, out = junction(residual, V, x, slot, shift, lo, hi,
                                  weight=torch.ones(d), backend=args.backend)
    after = residual @ V.T
    print(f"junction op on backend {name!r}: T={T} tokens, d={d}, K={K} concepts")
    print(f"{'token':<6}{'slot':<26}" + "".join(f"{n + ' before->after':>26}" for n in names))
    labels = ["0 (monitor only)", "1 (add 2.0 calm)", "2 (ablate desperate)",
              "3 (cap afraid at 0.5)"]
    for t in range(T):
        cells = "".join(f"{float(before[t, k]):>12.3f} -> {float(after[t, k]):<10.3f}"
                        for k in range(K))
        print(f"{t:<6}{labels[t]:<26}{cells}")
    # a quick timing at a prefill-like size
    T2 = 512
    r2, x2 = torch.randn(T2, d), torch.randn(T2, d)
    s2 = torch.randint(0, 4, (T2,), dtype=torch.int32)
    junction(r2, V, x2, s2, shift, lo, hi, weight=torch.ones(d), backend=args.backend)
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        junction(r2, V, x2, s2, shift, lo, hi, weight=torch.ones(d), backend=args.backend)
    dt = (time.perf_counter() - t0) / n
    print(f"\n{T2} tokens x d={d} x K={K}, fused add+project+steer+RMSNorm: "
          f"{dt * 1e6:.0f} us per call ({T2 / dt / 1e6:.2f} M tokens/s) on this CPU")
    return 0
