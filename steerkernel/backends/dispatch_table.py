"""Shape-aware automatic backend choice: the table (data only; read by :mod:`.dispatch`).

Rows are tried in order; the first row whose ``device`` matches and whose conditions hold
(``T``, ``K``, ``d``: ``[lo, hi)`` with None = unbounded; ``dtype``: the residual dtypes it
applies to) names the backends to try, best first; the first one available on this machine is
used.  A call whose shape is not known only matches rows without conditions on the missing
dimensions.  Written by ``python -m steerkernel.backends.dispatch_cli refresh`` from a result
of ``python -m benchmarks --device cuda``; check a hand edit with ``... dispatch_cli check``.

THE ROWS BELOW ARE PREDICTIONS, NOT MEASUREMENTS ("measured": False): no GPU had been
lent when they were written.

Rows with a ``T`` condition apply only with ``STEERKERNEL_DISPATCH_BY_T=1``: by default the
choice ignores the batch size, so a row's bits do not depend on the rows sharing its call
(batch invariance, docs/design.md §2).  The predicted CUDA rows: by default the CUDA extension
when built, else Triton (the CUDA kernel's decode path finishes a call in one launch); opted
in, the Triton tile path (64-row tiles, the projection on bf16 tensor cores) from T >= 4096
with K >= 8, where it is predicted 3-5x faster than the CUDA kernel's CUDA-core FMAs.
"""

TABLE = {'version': 1,
 'source': 'prediction (no GPU measurement yet)',
 'measured': False,
 'rows': [{'device': 'cpu',
           'backends': ['cpu'],
           'measured': False,
           'why': 'CPU tensors: the C++ kernel (the only CPU backend besides the reference)'},
          {'device': 'cuda',
           'T': [4096, None],
           'K': [8, None],
           'backends': ['triton', 'cuda'],
           'measured': False,
           'why': 'opt-in (STEERKERNEL_DISPATCH_BY_T=1), prefill sizes: the Triton tile path, '
                  'predicted 3-5x faster than the CUDA kernel (predicted, not measured)'},
          {'device': 'cuda',
           'backends': ['cuda', 'triton'],
           'measured': False,
           'why': 'batch-invariant default (every T): the CUDA extension when built, else Triton '
                  '(predicted, not measured)'}]}
