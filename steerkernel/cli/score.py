"""``steerkernel score``: mean projection of texts on every concept of a bank."""
from __future__ import annotations

import json
import math
from typing import List

from ._common import positive_int, printable


def add_arguments(p) -> None:
    p.add_argument("--bank", required=True, help="concept bank (.safetensors)")
    p.add_argument("--input", required=True,
                   help="JSONL file, one {\"text\": ...} object per line ('-' = stdin)")
    p.add_argument("--layer", type=int, default=None,
                   help="decoder layer to read (default: the bank's default layer)")
    p.add_argument("--model", default=None,
                   help="local HF checkpoint directory or .gguf file (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per text: text, layer, scores, z")
    p.add_argument("--top", type=int, default=5, help="concepts shown per text without --json")
    p.add_argument("--batch-size", type=positive_int, default=16)


def read_texts(path: str) -> List[str]:
    """The ``"text"`` of every non-blank line of a JSONL file (``"-"``: stdin); a regular file
    of at most :data:`~steerkernel.fileio.MAX_TEXT_INPUT_BYTES` (errors name the line)."""
    from ..fileio import jsonl_records, read_text_input, text_lines

    texts = []
    for no, rec in jsonl_records(text_lines(read_text_input(path, "--input")), path):
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) \
                or not rec["text"].strip():
            raise ValueError(f"{path} line {no}: expected an object with a non-empty "
                             "\"text\" string")
        texts.append(rec["text"])
    if not texts:
        raise ValueError(f"{path}: no texts to score")
    return texts


def _num(x) -> object:
    """A JSON-safe number: NaN / inf (unknown statistics) become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def run(args) -> int:
    from ..concepts.bank import ConceptBank
    from ..concepts.extract import score_texts
    from ..live import load_model_quietly

    bank = ConceptBank.load(args.bank)
    layer = bank.layers[bank.layer_index(args.layer)]  # fail fast on a layer the bank lacks
    texts = read_texts(args.input)
    model, tok = load_model_quietly(args.model)
    scores, z = score_texts(model, tok, bank, texts, layer, batch_size=args.batch_size)
    for i, text in enumerate(texts):
        if args.json:
            print(json.dumps({"text": text, "layer": layer,
                              "scores": {n: _num(scores[i, k]) for k, n in enumerate(bank.names)},
                              "z": {n: _num(z[i, k]) for k, n in enumerate(bank.names)}}))
        else:  # z where the bank has baseline statistics; raw scores where it has none
            zi = z[i]
            if bool(zi.isnan().all()) and not bool(scores[i].isnan().all()):
                vals, unit = scores[i], ""
            else:
                vals, unit = zi, "z"
            top = vals.nan_to_num(nan=-float("inf")).argsort(descending=True)
            shown = "  ".join(f"{printable(bank.names[k])} {float(vals[k]):+.2f}{unit}"
                              for k in top[:max(args.top, 1)].tolist())
            print(f"[{i}] {text[:60]!r}: {shown}")
    return 0
