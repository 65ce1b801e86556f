"""``steerkernel.attach`` for HF transformers causal LMs.

``attach(model, bank)`` installs, per decoder layer, either a fused forward (families in
:mod:`.families`: both residual adds by the junction op, the pre-FFN RMSNorm fused into the mid
junction and the next layer's input RMSNorm into the end junction) or, for any other
architecture, a forward hook doing one in-place junction call on the layer output.  A
forward pre-hook on the decoder stack reads the batch shape, the attention mask and the KV-cache
length once per forward, and hands the junctions their per-token slot vector and score views.

Per forward of ``B`` rows × ``S`` new tokens (``T = B·S`` token rows, row-major):

* token ``(b, s)`` gets slot ``b + 1`` if row ``b`` has a program that applies in the current
  phase (``prompt`` when the KV cache is empty, ``generated`` after), else slot 0; padded
  positions always get slot 0 and are left out of the traces.  Padding is read from the mask
  the decoder stack receives: a 2-D ``[B, >= S]`` mask (0 = pad), or the 4-D ``[B, 1, S, KV]``
  mask ``generate`` builds for a static cache (bool, or additive float) and the dict of such
  masks multimodal wrappers pass, where a token is a pad when it may not attend to itself;
* at bank layer position ``i`` (decoder layer ``bank.layers[i]``) the junction writes the
  scores ``p = V_i h`` ``[T, K]`` into the monitor buffer and applies the slot's
  ``clamp(p + shift, lo, hi)`` update (docs/design.md §2);
* after the forward, each row's non-padded tokens are appended to its trace
  ``[n_tokens, L, K]``.

Inference only: the junction writes activations in place, which autograd cannot track, so a
forward with gradients enabled is refused when any parameter of the model, or the
``inputs_embeds`` it is given, requires grad.

One handle per decoder stack: attaching to a model whose decoder layers another live handle
already patches (say ``model.model`` while ``model`` is attached) is refused.  A copy of an
attached model (``copy.deepcopy``) shares the original handle's hooks and fused forwards, so
its forwards are refused with an error; copy before attaching or after detaching.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ... import backends, requirements
from ...errors import BankMismatchError, SpecError, UnsupportedModelError
from ...introspect import find_decoder_layers, text_config
from ...ops import MODEL_DTYPES
from ...steering import (CompiledProgram, Program, ProgramLike, SlotTables,
                         compile_program)
from ..site import Steering
from .families import FAMILIES, Family, check_layer, family_for, norm_eps
from .layers import (Junctions, fused_norm_weight, fusable_norm, make_fused_forward,
                     make_generic_hook)
from .trace import TraceStore

PATHS = ("auto", "fused", "generic")

#: the decoder stacks and layers live handles patch (so no second handle patches them)
_CLAIMED: "weakref.WeakKeyDictionary[nn.Module, SteeringHandle]" = weakref.WeakKeyDictionary()
_MISSING = object()


def check_transformers_version(version: Optional[str] = None) -> str:
    """Raise :class:`UnsupportedModelError` unless transformers ``version`` lies in the range
    pyproject.toml declares (the versions whose decoder layers the fused forwards were checked
    against; :func:`steerkernel.requirements.supported_range`)."""
    if version is None:
        import transformers

        version = transformers.__version__
    if not requirements.is_supported("transformers", version):
        spec = requirements.supported_range("transformers")
        raise UnsupportedModelError(
            f"transformers {version} is not supported by steerkernel.attach "
            f"(supported: {spec}); install a supported version, e.g. "
            f"pip install 'transformers{spec}'")
    return version


def _check_bank(bank, model: nn.Module, num_layers: int, d: int) -> None:
    check = getattr(bank, "check_fits", None)
    if callable(check):
        check(model)
    site = getattr(bank, "site", "resid_post")
    if site != "resid_post":
        raise BankMismatchError(f"bank site {site!r} is not supported (only 'resid_post')")
    dirs = bank.directions
    L, K = len(bank.layers), len(bank.names)
    if dirs.dim() != 3 or tuple(dirs.shape) != (L, K, dirs.shape[-1]):
        raise BankMismatchError(f"bank directions have shape {tuple(dirs.shape)}, expected "
                                f"[L={L}, K={K}, d]")
    if dirs.shape[-1] != d:
        raise BankMismatchError(f"bank hidden size {dirs.shape[-1]} does not match the model's "
                                f"hidden size {d}")
    bad = [l for l in bank.layers if not 0 <= int(l) < num_layers]
    if bad:
        raise BankMismatchError(f"bank layers {bad} are out of range for a model with "
                                f"{num_layers} decoder layers")
    if not torch.isfinite(dirs).all():
        raise BankMismatchError("bank directions contain NaN or inf")
    for name in ("baseline_mean", "baseline_std"):
        t = getattr(bank, name)
        if tuple(t.shape) != (L, K):
            raise BankMismatchError(f"bank {name} has shape {tuple(t.shape)}, expected {(L, K)}")
    if tuple(bank.resid_norm.shape) != (L,):
        raise BankMismatchError(f"bank resid_norm has shape {tuple(bank.resid_norm.shape)}, "
                                f"expected {(L,)}")


class SteeringHandle:
    """A monitored / steered HF model.  Create with :func:`attach`; undo with :meth:`detach`
    (also on leaving a ``with`` block).

    Attributes:
        path: ``"fused"`` or ``"generic"``.  family: the :class:`Family` (None on generic).
        layers: the bank's decoder layers (trace order).  names: the K concept names.
    """

    def __init__(self, model, bank, *, monitor, path, family, base, layer_list, junctions,
                 tables, store, max_batch, device):
        self.model, self.bank = model, bank
        self.path, self.family = path, family
        self.layers = [int(x) for x in bank.layers]
        self.names = list(bank.names)
        self._base, self._layer_list = base, layer_list
        self._j: Junctions = junctions
        self._tables: SlotTables = tables
        self._store = store
        self._own_store = isinstance(store, TraceStore)
        self.max_batch = max_batch
        self._device = device
        self._mu = bank.baseline_mean.detach().float().cpu()
        self._sd = bank.baseline_std.detach().float().cpu().clamp_min(1e-6)
        self._hooks: list = []
        self._forwards: List[Tuple[nn.Module, object]] = []
        self._broadcast: Optional[CompiledProgram] = None
        self._rows: Optional[List[Optional[CompiledProgram]]] = None
        self._sequence = 0
        self._batch = 0
        self._phase = "prompt"
        self._pending_rows: Optional[list] = None
        self._slot_key = None
        self._slot_cache: Optional[Tensor] = None
        self._params = list(model.parameters())
        self._attached = False
        self._warned_inputs = False
        self._base_params = [p.name for p in inspect.signature(base.forward).parameters.values()
                             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    # ------------------------------------------------------------------ install / remove
    def _install(self, fused_forwards, generic_hooks) -> None:
        for layer, fwd in fused_forwards:
            self._forwards.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.forward = fwd
        for layer, hook in generic_hooks:
            self._hooks.append(layer.register_forward_hook(hook))
        # The per-forward bookkeeping reads the mask and cache on the host: torch.compile runs
        # it eagerly (one graph break before and after the decoder stack), never traces it.
        pre = torch.compiler.disable(self._pre_forward)
        post = torch.compiler.disable(self._post_forward)
        self._hooks.append(self._base.register_forward_pre_hook(pre, with_kwargs=True))
        self._hooks.append(self._base.register_forward_hook(post))
        self._attached = True
        for m in (self._base, *self._layer_list):
            _CLAIMED[m] = self

    def detach(self) -> None:
        """Remove every hook and fused forward: the model behaves exactly as before attach."""
        if not self._attached:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer, old in reversed(self._forwards):
            if old is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old
        self._forwards.clear()
        self._attached = False
        for m in (self._base, *self._layer_list):
            if _CLAIMED.get(m) is self:
                del _CLAIMED[m]

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _need_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this steerkernel handle has been detached")

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (f"<SteeringHandle {state} path={self.path} family="
                f"{self.family.name if self.family else None} layers={len(self.layers)} "
                f"K={len(self.names)}>")

    # ------------------------------------------------------------------ programs
    def compile(self, program: ProgramLike) -> CompiledProgram:
        """Resolve a program (Program, Steer, list, string) against this handle's bank."""
        return compile_program(program, self.bank)

    def set_program(self, program: ProgramLike) -> None:
        """Steer every row of the following forwards with ``program`` (None: stop steering).
        Each row keeps its own slot, so latched gates stay per row."""
        self._need_attached()
        compiled = compile_program(program, self.bank) if program is not None else None
        self._broadcast, self._rows = compiled, None

    def set_programs(self, programs: Sequence[ProgramLike]) -> None:
        """One program per batch row (None: that row is not steered).  Takes effect at the
        next forward; tables are rewritten in place (no reallocation)."""
        self._need_attached()
        if isinstance(programs, (str, Program)) or not isinstance(programs, Sequence):
            raise SpecError("set_programs takes a list with one program per batch row; "
                            "use set_program for the whole batch")
        if len(programs) > self.max_batch:
            raise SpecError(f"{len(programs)} programs but attach(max_batch={self.max_batch}) "
                            "has slots for at most that many rows")
        compiled = [compile_program(p, self.bank) if p is not None else None for p in programs]
        self._broadcast, self._rows = None, compiled

    def clear_programs(self) -> None:
        self._need_attached()
        self._broadcast, self._rows = None, None

    # ------------------------------------------------------------------ traces
    def trace(self, z: bool = False) -> List[Tensor]:
        """Per batch row of the current sequence, the ``[n_tokens, L, K]`` projections of its
        non-padded tokens at the bank layers (``z=True``: z-scored against the bank
        baseline).  A new sequence (a forward with an empty KV cache) starts fresh traces."""
        if not self._own_store:
            raise RuntimeError("traces live in the monitor passed to attach(monitor=...)")
        out = []
        for b in range(self._batch):
            t = self._store.trace(b)
            out.append((t - self._mu) / self._sd if z else t)
        return out

    def z(self, scores: Tensor) -> Tensor:
        """z-score ``[..., L, K]`` projections against the bank's baseline."""
        return (scores - self._mu) / self._sd

    # ------------------------------------------------------------------ per forward
    def _request_id(self, b: int) -> Hashable:
        return b if self._own_store else (self._sequence, b)

    def _row_slots(self, B: int, phase: str) -> Tuple[List[int], bool, bool]:
        if self._rows is not None and len(self._rows) != B:
            raise SpecError(f"set_programs was given {len(self._rows)} programs but the batch "
                            f"has {B} rows")
        if self._broadcast is None and self._rows is None:
            return [0] * B, False, False
        progs = self._rows if self._rows is not None else [self._broadcast] * B
        slots, gated, latched = [], False, False
        for b, c in enumerate(progs):
            if c is None or c.identity[phase]:
                slots.append(0)
                continue
            if b + 1 >= self._tables.P:
                raise SpecError(f"batch row {b} is steered but attach(max_batch="
                                f"{self.max_batch}) has slots for {self.max_batch} rows")
            held = self._tables.held(b + 1)
            if held is None or held[0] is not c:
                self._tables.assign(b + 1, c, phase)
            elif held[1] != phase:
                self._tables.set_phase(b + 1, phase)
            slots.append(b + 1)
            gated |= c.gated
            latched |= c.latched
        return slots, gated, latched

    def _pre_forward(self, module, args, kwargs):
        if module is not self._base:
            raise RuntimeError(
                f"steerkernel: this {type(module).__name__} is a copy of a model that was "
                "attached when it was copied (copy.deepcopy kept the original handle's hooks "
                "and fused forwards, which run the original's layers); copy the model before "
                "attach or after detach")
        bound = dict(zip(self._base_params, args))
        bound.update(kwargs)
        if torch.is_grad_enabled():
            emb = bound.get("inputs_embeds")
            if (isinstance(emb, Tensor) and emb.requires_grad) \
                    or any(p.requires_grad for p in self._params):
                raise RuntimeError(
                    "steerkernel: an attached model runs inference only (the junction edits "
                    "activations in place, which autograd cannot track); call it under "
                    "torch.no_grad() or torch.inference_mode()")
        x = bound.get("input_ids")
        if x is None:
            x = bound.get("inputs_embeds")
        if x is None or x.dim() < 2:
            if not self._warned_inputs:
                warnings.warn("steerkernel: cannot find input_ids / inputs_embeds in the call to "
                              f"{type(module).__name__}; this forward is neither steered nor "
                              "recorded", stacklevel=2)
                self._warned_inputs = True
            self._j.end_forward()
            return None
        B, S = int(x.shape[0]), int(x.shape[1])
        T = B * S
        cache = bound.get("past_key_values")
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        phase = "prompt" if past == 0 else "generated"
        if past == 0:
            self._sequence += 1
            self._tables.reset_latches()
            if self._own_store:
                self._store.reset()
        self._batch, self._phase = B, phase

        valid = None
        v = real_tokens(bound.get("attention_mask"), B, S, past, bound.get("cache_position"))
        if v is not None and not bool(v.all()):
            valid = v

        slots, gated, latched = self._row_slots(B, phase)
        slot = None
        if any(slots):
            key = (tuple(slots), S)
            if valid is None and key == self._slot_key:
                slot = self._slot_cache
            else:
                rs = torch.tensor(slots, dtype=torch.int32, device=self._device)
                slot = rs.repeat_interleave(S)
                if valid is not None:
                    slot = slot * valid.reshape(-1).to(device=self._device, dtype=torch.int32)
                    self._slot_key = None
                else:
                    self._slot_key, self._slot_cache = key, slot
            if latched:
                self._tables.begin_forward()

        views = None
        if self._store is not None:
            if hasattr(self._store, "reserve"):
                self._store.reserve(T)
            views = [self._store.scores_view(i, T) for i in range(len(self.layers))]
            if tuple(views[0].shape) != (T, len(self.names)):
                raise SpecError(f"the monitor's buffer gives a {tuple(views[0].shape)} view "
                                f"for a forward of {T} tokens x {len(self.names)} concepts "
                                "(raise its max_tokens)")
            if valid is None:
                rows = [(self._request_id(b), S) for b in range(B)]
            else:
                rows = []
                for b, flags in enumerate(valid.tolist()):
                    for keep, n in _runs(flags):
                        rows.append((self._request_id(b) if keep else None, n))
            self._pending_rows = rows
        self._j.begin(T, Steering(slot, gated, latched) if slot is not None else None, views)
        return None

    def _post_forward(self, module, args, output):
        rows, self._pending_rows = self._pending_rows, None
        self._j.end_forward()
        if rows is not None and self._store is not None:
            self._store.record(rows)
        return None


def real_tokens(mask, B: int, S: int, past: int, cache_position=None) -> Optional[Tensor]:
    """``[B, S]`` bool, False at padded positions of the forward's ``S`` new tokens, read from
    the attention mask the decoder stack receives; None when the mask says nothing (absent, or
    a form not understood, e.g. a flex-attention BlockMask).

    * 2-D ``[B, >= S]`` (1 = token, 0 = pad): its last ``S`` columns.
    * 4-D ``[B, 1 or H, S, KV]`` (what ``generate`` passes with a static cache): bool (True =
      may attend) or additive float (0 = may attend, a large negative number or -inf = masked).
      Token ``s`` sits at key column ``cache_position[s]`` (else ``past + s``); it is a pad
      exactly when it may not attend to itself, whatever the causal or sliding-window
      structure around it (both always allow the diagonal).
    * a dict of such masks (multimodal wrappers such as Gemma-3's): its ``full_attention``
      entry, else its first tensor.
    """
    if isinstance(mask, dict):
        full = mask.get("full_attention")
        mask = full if isinstance(full, Tensor) else next(
            (m for m in mask.values() if isinstance(m, Tensor)), None)
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4) or mask.shape[0] != B:
        return None
    if mask.dim() == 2:
        return mask[:, -S:] != 0 if mask.shape[1] >= S else None
    if mask.shape[2] != S:
        return None
    kv = mask.shape[3]
    if isinstance(cache_position, Tensor) and cache_position.numel() == S:
        cols = cache_position.reshape(S).to(device=mask.device, dtype=torch.long).clamp(0, kv - 1)
    elif past + S <= kv:
        cols = torch.arange(past, past + S, device=mask.device)
    else:
        return None
    diag = mask[:, 0, torch.arange(S, device=mask.device), cols]  # [B, S]
    if diag.dtype == torch.bool:
        return diag
    if diag.is_floating_point():
        return diag > torch.finfo(diag.dtype).min / 2
    return diag != 0


def _runs(flags: Sequence[bool]) -> List[Tuple[bool, int]]:
    """Run-length encoding: ``[T, T, F, T] -> [(True, 2), (False, 1), (True, 1)]``."""
    out: List[Tuple[bool, int]] = []
    for f in flags:
        if out and out[-1][0] == f:
            out[-1] = (f, out[-1][1] + 1)
        else:
            out.append((f, 1))
    return out


def attach(model: nn.Module, bank, monitor=True, program: ProgramLike = None, *,
           path: str = "auto", backend: Optional[str] = None, max_batch: int = 16
           ) -> SteeringHandle:
    """Monitor and steer an HF causal LM along the concept directions of ``bank``.

    Args:
        model: a transformers model (``PreTrainedModel``) whose decoder layers the bank fits.
        bank: a :class:`steerkernel.ConceptBank` (site ``resid_post``, layers of this model).
        monitor: True (keep per-row traces, see :meth:`SteeringHandle.trace`), False, or an
            object with ``scores_view(layer_pos, T)`` and ``record(rows)`` such as
            :class:`steerkernel.monitor.MonitorEngine` (request ids are ``(sequence, row)``).
        program: optional steering program for every row (see :mod:`steerkernel.steering`).
        path: ``"auto"`` (fused forward for known families, generic hook otherwise),
            ``"fused"`` (error if the family is unknown) or ``"generic"``.
        backend: junction backend (None: automatic, see :mod:`steerkernel.backends`).
        max_batch: most batch rows steered at once (the slot tables hold ``max_batch + 1``
            slots, allocated here once).

    Raises:
        UnsupportedModelError: unsupported transformers version, model or dtype.
        BankMismatchError: the bank was made for another model.
        UnknownConceptError / SpecError: a bad ``program``.
    Nothing is changed on the model unless attach returns.
    """
    check_transformers_version()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"attach needs a torch nn.Module, got {type(model).__name__}")
    if path not in PATHS:
        raise SpecError(f"path must be one of {PATHS}, got {path!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise SpecError(f"max_batch must be a positive int, got {max_batch!r}")
    cfg = text_config(model)
    num_layers = getattr(cfg, "num_hidden_layers", None)
    d = getattr(cfg, "hidden_size", None)
    if not isinstance(num_layers, int) or not isinstance(d, int):
        raise UnsupportedModelError(f"{type(model).__name__}'s config has no integer "
                                    "num_hidden_layers / hidden_size")
    model_type = getattr(cfg, "model_type", None)
    fam: Optional[Family] = family_for(model_type) if path != "generic" else None
    base, layer_list = find_decoder_layers(model, num_layers, fam.layer_classes if fam else ())
    owner = next((_CLAIMED[m] for m in (base, *layer_list) if m in _CLAIMED), None)
    if owner is not None and owner.model is model:
        raise SpecError("this model already has a steerkernel handle attached; detach it first")
    if owner is not None:
        raise SpecError(f"this model's decoder layers are already steered by a steerkernel handle "
                        f"attached to a {type(owner.model).__name__}; detach it first")
    _check_bank(bank, model, num_layers, d)

    params = list(model.parameters())
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise UnsupportedModelError(f"model parameters span devices {sorted(map(str, devices))}; "
                                    "attach supports single-device models")
    device = devices.pop()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None and hasattr(emb, "weight") else params[0].dtype
    if dtype not in MODEL_DTYPES:
        raise UnsupportedModelError(f"model dtype {dtype} is not supported (use one of "
                                    f"{', '.join(map(str, MODEL_DTYPES))})")
    backend_name = backends.resolve(device, backend)
    op = backends.op_for(backend_name)

    if fam is not None:
        why = next((w for w in (check_layer(fam, layer, d) for layer in layer_list) if w), None)
        if why is not None:
            if path == "fused":
                raise UnsupportedModelError(f"fused path unavailable for {model_type}: {why}")
            warnings.warn(f"steerkernel: {why}; using the generic hook path", stacklevel=2)
            fam = None
    elif path == "fused":
        raise UnsupportedModelError(
            f"no fused forward for model_type {model_type!r}; fused families: "
            f"{', '.join(sorted(FAMILIES))} (use path='auto' or 'generic')")
    chosen = "fused" if fam is not None else "generic"

    initial = compile_program(program, bank) if program is not None else None

    L, K = len(bank.layers), len(bank.names)
    positions = [-1] * num_layers
    for i, layer in enumerate(bank.layers):
        positions[int(layer)] = i
    V = [bank.directions[i].detach().to(device=device, dtype=torch.float32).contiguous()
         for i in range(L)]
    tables = SlotTables(L, max_batch + 1, K, device)
    j = Junctions(op, positions, V, tables, d, device)

    # validate every buffer the hot path hands the raw op, once, before touching the model
    for site in j.sites:
        site.validate(d, dtype, backend_name)
    fused, generic = [], []
    if fam is not None:
        for idx, layer in enumerate(layer_list):
            nxt = layer_list[idx + 1] if idx + 1 < len(layer_list) else None
            fwd = make_fused_forward(layer, fam, j, idx, d, dtype, nxt)
            for name in (fam.pre_ffn, fam.pre_attn):
                if fusable_norm(fam, name):
                    norm = getattr(layer, name)
                    j.add_norm.validate(d, dtype, backend_name,
                                        weight=fused_norm_weight(fam, norm, dtype),
                                        eps=norm_eps(norm))
            fused.append((layer, fwd))
    else:
        for i, layer in enumerate(bank.layers):
            generic.append((layer_list[int(layer)], make_generic_hook(j, int(layer), d)))

    if monitor is True:
        store = TraceStore(L, K, device)
    elif monitor is False or monitor is None:
        store = None
    elif callable(getattr(monitor, "scores_view", None)) and callable(getattr(monitor, "record",
                                                                               None)):
        view = monitor.scores_view(0, 1)
        if (not isinstance(view, Tensor) or tuple(view.shape) != (1, K)
                or view.dtype != torch.float32 or view.device != device or view.stride(1) != 1):
            raise SpecError("monitor.scores_view(layer_pos, T) must give fp32 [T, K] views on "
                            f"{device} with unit stride along K (K = {K})")
        store = monitor
    else:
        raise SpecError("monitor must be True, False or an object with scores_view() and "
                        f"record() (e.g. steerkernel.monitor.MonitorEngine), got {monitor!r}")

    handle = SteeringHandle(model, bank, monitor=monitor, path=chosen, family=fam, base=base,
                            layer_list=layer_list, junctions=j, tables=tables, store=store,
                            max_batch=max_batch, device=device)
    handle._install(fused, generic)
    if initial is not None:
        handle._broadcast = initial
    return handle
