"""Architecture families: where each family keeps its linear layers and its task head.

Target presets are regexes over module names (``re.search``), so one preset serves every size of a
family. A new family is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    presets: dict[str, tuple[str, ...]]  # preset name -> module-name regexes
    head: tuple[str, ...]  # task-head module names (trained or frozen by the method's `train_head`)


_BERT_ATTN = (r"attention\.self\.(query|key|value)$", r"attention\.output\.dense$")
_BERT_MLP = (r"intermediate\.dense$", r"layer\.\d+\.output\.dense$")
_DEC_ATTN = (r"self_attn\.(q_proj|k_proj|v_proj|o_proj)$",)
_DEC_MLP = (r"mlp\.(gate_proj|up_proj|down_proj)$",)
_OPT_ATTN = (r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$",)
_OPT_MLP = (r"layers\.\d+\.(fc1|fc2)$",)

FAMILIES: dict[str, Family] = {
    # BERT, RoBERTa, MiniLM: query/key/value/attention.output.dense
    "bert": Family(
        presets={
            "attention": _BERT_ATTN,
            "qkv": (r"attention\.self\.(query|key|value)$",),
            "qv": (r"attention\.self\.(query|value)$",),
            "attention_mlp": _BERT_ATTN + _BERT_MLP,
            "all_linear": _BERT_ATTN + _BERT_MLP,
        },
        head=("classifier",),
    ),
    # OPT: q_proj/k_proj/v_proj/out_proj, fc1/fc2
    "opt": Family(
        presets={
            "attention": _OPT_ATTN,
            "qkv": (r"self_attn\.(q_proj|k_proj|v_proj)$",),
            "attention_mlp": _OPT_ATTN + _OPT_MLP,
            "all_linear": _OPT_ATTN + _OPT_MLP,
        },
        head=("score",),
    ),
    # Llama, Qwen, Gemma, SmolLM: q_proj/k_proj/v_proj/o_proj, gate/up/down_proj
    "llama": Family(
        presets={
            "attention": _DEC_ATTN,
            "qkv": (r"self_attn\.(q_proj|k_proj|v_proj)$",),
            "qv": (r"self_attn\.(q_proj|v_proj)$",),
            "attention_mlp": _DEC_ATTN + _DEC_MLP,
            "all_linear": _DEC_ATTN + _DEC_MLP,
        },
        head=("score", "lm_head"),
    ),
}
