"""Published architectures of the models the study and this project use, by ``conf/model`` option name: the
one table of their shapes (the Hub's ``config.json`` fields the structure needs). A meta-device model built
from it has the real shapes without a download: pre-flight figures for models that are not at hand (the
memory table for the study's presets), the efficiency bench's random-weight models, budget tests."""

from __future__ import annotations

import torch
from torch import nn

# option name -> (transformers class prefix, config fields)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "smollm2_135m": ("Llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)),
    "gemma2_2b": ("Gemma2", dict(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                 head_dim=256, intermediate_size=9216, vocab_size=256000)),
    "llama32_3b": ("Llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                                 num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                 tie_word_embeddings=True)),
    "qwen2_7b": ("Qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064)),
    "llama3_8b": ("Llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, vocab_size=128256)),
}


def config(name: str, **overrides):
    """The transformers config of ``name`` (``overrides`` replace fields, e.g. a small ``vocab_size``)."""
    import transformers

    prefix, fields = ARCHITECTURES[name]
    return getattr(transformers, f"{prefix}Config")(**{**fields, **overrides})


def meta_causal_lm(name: str, **overrides) -> nn.Module:
    """``name``'s causal LM on the meta device: every shape, no weights, no download."""
    import transformers

    prefix = ARCHITECTURES[name][0]
    with torch.device("meta"):
        return getattr(transformers, f"{prefix}ForCausalLM")(config(name, **overrides))
