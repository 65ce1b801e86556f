"""Monitored, optionally steered generation, one token at a time.

The engine behind ``steerkernel monitor``, ``steerkernel generate`` and ``steerkernel demo``:
a plain KV-cache decoding loop over a (left-padded) batch of prompts on an HF causal LM with a
concept bank attached (:func:`steerkernel.attach`) and a
:class:`steerkernel.monitor.MonitorEngine` as its monitor, so alarms and sinks work as they do
in serving.

What a token's scores mean.  The projections reported for generated token ``i`` are read when
that token is fed back into the model (the forward after it was sampled): ``p = V_l h_l``, the
residual stream *at that token's position* at the output of decoder layer ``l`` -- the same
quantity :func:`steerkernel.concepts.score_texts` and the bank's z-score baseline use.  The
junction reads ``p`` before its own layer's intervention (docs/design.md §2), but under steering the
residual already carries the edits of the earlier steered layers (and of earlier tokens, through
attention).  To measure what steering changed in the *text*, re-read the generated tokens on the
unsteered model with :func:`reread` (what ``steerkernel demo`` reports).

Sampling: ``temperature == 0`` is greedy; otherwise softmax sampling at that temperature over
the ``top_k`` most likely tokens (0 = all), from a ``torch.Generator`` seeded with ``seed``.
``repetition_penalty`` > 1 (CTRL-style) divides positive / multiplies negative logits of tokens
already in the row.  A row stops at an end-of-sequence token (not shown, not fed back) or after
``max_new_tokens``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import SpecError
from .limits import quote_input
from .monitor import AlarmRule, MonitorEngine
from .monitor.engine import AlarmEvent


@dataclass
class TokenRecord:
    """One generated token of one batch row, with its concept projections.

    ``index``: 0-based among the row's generated tokens; ``scores`` / ``z``: ``[L, K]`` raw
    projections / z-scores at every bank layer (see the module docs).
    """

    row: int
    index: int
    token_id: int
    text: str
    scores: Tensor
    z: Tensor


@dataclass
class Generation:
    """One finished row: its prompt, generated tokens and traces.

    ``prompt_scores [n_prompt, L, K]`` and ``scores [n_new, L, K]`` are raw projections (the
    prompt's padded positions excluded); ``z`` is ``scores`` z-scored against the bank.
    ``finished`` is ``"eos"`` or ``"length"``; ``alarms`` are the monitor's alarm events with
    ``token`` counted from the first prompt token (``AlarmEvent.token - len(prompt_ids)`` is
    the generated-token index, negative inside the prompt).
    """

    row: int
    program: Optional[str]
    prompt_ids: List[int]
    token_ids: List[int]
    pieces: List[str]
    text: str
    finished: str
    prompt_scores: Tensor
    scores: Tensor
    z: Tensor
    alarms: List[AlarmEvent] = field(default_factory=list)


def load_model_quietly(name: Optional[str] = None):
    """:func:`steerkernel.load_model` without transformers' "Loading weights" bar, except when
    the load is long work (the default model's first dequantisation, a .gguf file)."""
    from .models import DEFAULT_NAME, default_model_status, load_model

    default = name in (None, "default", DEFAULT_NAME)
    if (default and not default_model_status().startswith(f"{DEFAULT_NAME}: cached")) or (
            isinstance(name, str) and name.endswith(".gguf")):
        return load_model(name)
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - transformers is required by load_model anyway
        return load_model(name)
    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        return load_model(name)
    finally:
        if was:
            tlog.enable_progress_bar()


def chat_ids(tokenizer, prompt: Union[str, Sequence[dict]], system: Optional[str] = None,
             chat: Optional[bool] = None) -> List[int]:
    """Token ids of a prompt.

    ``prompt`` is a user message (str) or a list of ``{"role", "content"}`` messages.  With a
    chat template (``chat`` None = use one when the tokenizer has one) the messages are rendered
    with the generation prompt appended; without, the contents are joined by newlines and
    tokenised with the tokenizer's special tokens.
    """
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                               for m in messages):
        raise ValueError("a prompt is a string or a list of {'role', 'content'} messages")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template (use raw prompts)")
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        text = "\n".join(m["content"] for m in messages)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = [int(x) for x in ids]
    if not ids:
        raise ValueError("the prompt has no tokens")
    return ids


def eos_ids(model, tokenizer) -> set:
    """End-of-sequence token ids from the tokenizer and the model's generation config."""
    out = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            out.add(src)
        elif isinstance(src, (list, tuple)):
            out.update(int(x) for x in src)
    return out


def _pad_id(model, tokenizer) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


class _Detok:
    """Incremental detokenisation: the text each new token adds (multi-byte safe)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ids, skip_special_tokens=False)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        piece = full[len(self.text):] if full.startswith(self.text) else \
            self.tok.decode([token_id], skip_special_tokens=False)
        self.text = full
        return piece


#: bounds of temperature (besides 0) and repetition_penalty
SAMPLING_MIN, SAMPLING_MAX = 1e-6, 1e6


def check_sampling(max_new_tokens: int, temperature: float, top_k: int,
                   repetition_penalty: float) -> None:
    """Raise :class:`SpecError` on sampling arguments out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= 100_000:
        raise SpecError(f"max_new_tokens must be an integer in [1, 100000], got "
                        f"{max_new_tokens!r}")
    # logits / temperature and logits * penalty must stay finite in fp32: 0 (greedy) or
    # [1e-6, 1e6] for both (the CLI's bounds)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (temperature == 0 or SAMPLING_MIN <= temperature <= SAMPLING_MAX):
        raise SpecError(f"temperature must be 0 (greedy) or in [{SAMPLING_MIN:g}, "
                        f"{SAMPLING_MAX:g}], got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SpecError(f"top_k must be an integer >= 0, got {top_k!r}")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not SAMPLING_MIN <= repetition_penalty <= SAMPLING_MAX:
        raise SpecError(f"repetition_penalty must be in [{SAMPLING_MIN:g}, {SAMPLING_MAX:g}], "
                        f"got {repetition_penalty!r}")


def _sample(logits: Tensor, history: List[List[int]], temperature: float, top_k: int,
            repetition_penalty: float, gen) -> Tensor:
    """Next tokens ``[B]``; ``gen``: one ``torch.Generator`` for the batch, or a list of one
    per row (each row then drawn on its own)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        for b, ids in enumerate(history):
            if ids:
                idx = torch.tensor(sorted(set(ids)), device=logits.device)
                v = logits[b, idx]
                logits[b, idx] = torch.where(v > 0, v / repetition_penalty,
                                             v * repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1).cpu()
    if isinstance(gen, list):
        picked = torch.cat([torch.multinomial(probs[b:b + 1], 1, generator=g)[:, 0]
                            for b, g in enumerate(gen)])
    else:
        picked = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return picked.to(logits.device)


def resolve_rules(rules: Sequence, bank, layer: int) -> List[AlarmRule]:
    """Rules as AlarmRule objects; a rule without ``@layer`` watches ``layer``."""
    out = []
    for r in rules:
        r = r if isinstance(r, AlarmRule) else AlarmRule.parse(r)
        if r.layer is None:
            r = dataclasses.replace(r, layer=layer)
        k = bank.concept_index(r.concept)  # UnknownConceptError names the bank's concepts
        li = bank.layer_index(r.layer)
        if r.zscore and not bool(bank.baseline_std[li, k].isfinite()):
            raise SpecError(f"alarm rule {quote_input(r.label)}: the bank has no baseline "
                            f"statistics for {quote_input(r.concept)} at layer {r.layer}, so "
                            "its z-score is undefined; write a raw rule (without 'z')")
        out.append(r)
    return out


def generate_monitored(model, tokenizer, bank, prompts: Sequence[Sequence[int]],
                       programs: Optional[Sequence] = None, *, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int = 0, repetition_penalty: float = 1.0,
                       seed: int = 0, rules: Sequence = (), sinks: Sequence = (),
                       layer: Optional[int] = None, backend: Optional[str] = None,
                       on_token: Optional[Callable[[TokenRecord], None]] = None,
                       on_alarm: Optional[Callable[[int, AlarmEvent], None]] = None,
                       row_seeds: Optional[Sequence[int]] = None) -> List[Generation]:
    """Generate from a batch of prompts (token-id lists), monitoring every bank layer and
    steering row ``b`` with ``programs[b]`` (None: not steered).

    ``on_token(record)`` is called for every generated token as soon as its projections are
    known (one forward after it was sampled); ``on_alarm(row, event)`` for every alarm that
    fires (``rules``: :class:`AlarmRule` objects or strings; a rule without ``@layer`` watches
    ``layer``, default the bank's default layer).  ``sinks`` (e.g. a
    :class:`steerkernel.monitor.JSONLSink`) receive the alarms and one summary per row.
    Sampling draws from one generator seeded with ``seed`` for the whole batch, or with
    ``row_seeds`` one generator per row: a row's draws then do not depend on the other rows, so
    two rows with the same seed share their random numbers (``generate --compare``) and a row
    samples what it would sample alone.  Returns one :class:`Generation` per prompt.
    """
    from .integrations import attach

    check_sampling(max_new_tokens, temperature, top_k, repetition_penalty)
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts to generate from")
    prompts = [[int(x) for x in p] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if programs is not None and len(programs) != B:
        raise ValueError(f"{len(programs)} programs for {B} prompts")
    if row_seeds is not None and len(row_seeds) != B:
        raise ValueError(f"{len(row_seeds)} row seeds for {B} prompts")
    layer = bank.layers[bank.layer_index(layer)]
    rules = resolve_rules(rules, bank, layer)
    device = next(model.parameters()).device
    pad, eos = _pad_id(model, tokenizer), eos_ids(model, tokenizer)

    S = max(len(p) for p in prompts)
    ids = torch.full((B, S), pad, dtype=torch.long, device=device)
    mask = torch.zeros(B, S, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding
        ids[b, S - len(p):] = torch.tensor(p, device=device)
        mask[b, S - len(p):] = 1
    mu = bank.baseline_mean.float().nan_to_num(0.0)
    sd = bank.baseline_std.float().nan_to_num(1.0).clamp_min(1e-6)
    engine = MonitorEngine(bank.names, bank.layers, max_tokens=max(B * S, B), max_requests=B,
                           device=device, baseline_mean=mu, baseline_std=sd, rules=rules,
                           sinks=sinks)
    if on_alarm is not None:  # attach names monitor requests (sequence, row)
        engine.on_alarm(lambda ev: on_alarm(int(ev.request_id[1]), ev))
    gen = (torch.Generator().manual_seed(int(seed)) if row_seeds is None
           else [torch.Generator().manual_seed(int(s)) for s in row_seeds])
    handle = attach(model, bank, monitor=engine, backend=backend, max_batch=B)
    token_ids: List[List[int]] = [[] for _ in range(B)]
    pieces: List[List[str]] = [[] for _ in range(B)]
    scores: List[List[Tensor]] = [[] for _ in range(B)]
    finished = [""] * B
    detok = [_Detok(tokenizer) for _ in range(B)]
    history = [list(p) for p in prompts] if repetition_penalty != 1.0 else [[] for _ in prompts]
    reports = []
    try:
        if programs is not None and any(p is not None for p in programs):
            handle.set_programs(list(programs))
        before = set(engine.open_requests())
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        rids = [r for r in engine.open_requests() if r not in before]
        if len(rids) != B:
            raise RuntimeError(f"the monitor opened {len(rids)} requests for {B} prompts")
        rids.sort(key=lambda r: r[1])
        next_pos = pos[:, -1] + 1
        past = out.past_key_values
        logits = out.logits[:, -1, :]
        for step in range(max_new_tokens):
            nxt = _sample(logits, history, temperature, top_k, repetition_penalty, gen)
            feed = torch.full((B,), pad, dtype=torch.long, device=device)
            alive = torch.zeros(B, dtype=torch.long, device=device)
            for b in range(B):
                if finished[b]:
                    continue
                t = int(nxt[b])
                if t in eos:
                    finished[b] = "eos"
                    continue
                feed[b], alive[b] = t, 1
                token_ids[b].append(t)
                if repetition_penalty != 1.0:
                    history[b].append(t)
                if len(token_ids[b]) >= max_new_tokens:
                    finished[b] = "length"
            if not bool(alive.any()):
                break
            mask = torch.cat([mask, alive[:, None]], 1)
            with torch.no_grad():
                out = model(input_ids=feed[:, None], attention_mask=mask,
                            position_ids=next_pos[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_pos = next_pos + alive
            logits = out.logits[:, -1, :]
            # this forward's scores: buffer row b holds row b's fed token (one token per row)
            fresh = engine.buffer[:, :B].detach().to("cpu", copy=True)  # [L, B, K]
            for b in range(B):
                if not int(alive[b]):
                    continue
                s = fresh[:, b]
                scores[b].append(s)
                piece = detok[b].add(token_ids[b][-1])
                pieces[b].append(piece)
                if on_token is not None:
                    on_token(TokenRecord(b, len(token_ids[b]) - 1, token_ids[b][-1], piece, s,
                                         (s - mu) / sd))
            if all(finished):
                break
        for b in range(B):
            finished[b] = finished[b] or "length"
        reports = [engine.close(r) for r in rids]
    finally:
        handle.detach()
    results = []
    L, K = len(bank.layers), bank.K
    for b in range(B):
        rep = reports[b]
        n_p = len(prompts[b])
        gen_scores = torch.stack(scores[b]) if scores[b] else torch.zeros(0, L, K)
        trace = rep.trace if rep.trace is not None else torch.zeros(0, L, K)
        results.append(Generation(
            row=b, program=None if programs is None or programs[b] is None else str(programs[b]),
            prompt_ids=prompts[b], token_ids=token_ids[b], pieces=pieces[b],
            text=tokenizer.decode(token_ids[b], skip_special_tokens=True),
            finished=finished[b], prompt_scores=trace[:n_p], scores=gen_scores,
            z=(gen_scores - mu) / sd, alarms=list(rep.alarms)))
    return results


def right_padded(model, tokenizer, seqs: Sequence[Sequence[int]]):
    """``(ids, mask)`` ``[B, S]`` on the model's device: the token sequences right-padded with
    the pad id (``mask`` 1 on real tokens), for one forward over all of them."""
    device = next(model.parameters()).device
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), _pad_id(model, tokenizer), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long, device=device)
        mask[b, :len(s)] = 1
    return ids, mask


def reread(model, tokenizer, bank, sequences: Sequence[Sequence[int]], *,
           backend: Optional[str] = None) -> List[Tensor]:
    """Raw projections ``[n_i, L, K]`` of every token of each sequence on the *unsteered*
    model (one right-padded batch; padding excluded).  Use it on ``prompt_ids + token_ids`` to
    measure what steering changed in the generated text itself."""
    from .integrations import attach

    seqs = [[int(x) for x in s] for s in sequences]
    if not seqs or any(not s for s in seqs):
        raise ValueError("reread needs non-empty token sequences")
    ids, mask = right_padded(model, tokenizer, seqs)
    with attach(model, bank, monitor=True, backend=backend, max_batch=len(seqs)) as h:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        return [t.clone() for t in h.trace()]


def token_cell(text: str, width: int) -> str:
    """A token's text for a table cell: escapes visible, fixed width."""
    s = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(s) > width:
        s = s[:width - 1] + "…"
    return s.ljust(width)


def top_concepts(z: Tensor, names: Sequence[str], n: int,
                 among: Optional[Tensor] = None) -> List[tuple]:
    """``[(name, z), ...]`` of the ``n`` largest entries of ``z [K]``, descending; ``among``
    ``[K]`` bool limits the ranking to those concepts (None: all)."""
    z = z.float()
    if among is not None:
        z = z.masked_fill(~among.to(torch.bool), -math.inf)
    n = max(1, min(int(n), len(names) if among is None else max(int(among.sum()), 1)))
    vals, idx = z.topk(n)
    return [(names[int(i)], float(v)) for v, i in zip(vals, idx)]


__all__ = ["TokenRecord", "Generation", "load_model_quietly", "chat_ids", "eos_ids", "generate_monitored", "reread", "right_padded",
           "top_concepts", "token_cell", "check_sampling"]
