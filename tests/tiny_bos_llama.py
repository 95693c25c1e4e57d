"""A tiny random Llama whose tokenizer adds a BOS token (as Gemma's, Llama's and OPT's do), built from fixed
rules and a seed: no training, no download, no committed weights. The lm-eval cross-check script
(``experiments/crosscheck/lm_eval_reference.py``) runs lm-evaluation-harness on it, and
``tests/test_eval_lm_eval_reference.py`` rebuilds the same model to compare ``speft.evaluation`` with the
harness's recorded outputs.

Tokenizer: byte-level BPE (every text encodes, as GPT-2/SmolLM2/Llama-3) over the 256 byte symbols, with
merges found by a plain greedy pair count on :data:`CORPUS` (ties: the smallest pair), after ``" A" .. " D"``
(one token each, as with the real tokenizers); ``<s>`` (BOS, added by the post-processor) and ``</s>``
(EOS). Model: 2 layers, hidden 32, weights drawn in parameter order from one ``torch.Generator``, with
logits spread wide enough (std about 3) that greedy decoding has no near-ties that padding could flip."""

from __future__ import annotations

import math
from collections import Counter

import torch

BOS, EOS = "<s>", "</s>"
NUM_MERGES = 300  # about 2.5 characters per token on GSM8K/MMLU text: short sequences, fast tests
CORPUS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer: Natalia sold 48/2 = <<48/2=24>>24 "
    "clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72\n\n"
    "Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?\nAnswer: Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, "
    "she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10\n\n"
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Which of the following is the body cavity that contains the pituitary gland?\nA. Abdominal\nB. Cranial\n"
    "C. Pleural\nD. Spinal\nAnswer: B\n\nThe answer is the number of the total of each of these that they have."
)


def merges(corpus: str = CORPUS, n: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Byte-level BPE merges: ``Ġ`` + ``A``..``D`` first, then ``n`` greedy most-frequent pairs."""
    from tokenizers import pre_tokenizers

    words = Counter(w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(corpus))
    split = {w: list(w) for w in words}
    out: list[tuple[str, str]] = []

    def apply(pair: tuple[str, str]) -> None:
        out.append(pair)
        for w, parts in split.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            split[w] = merged

    for letter in "ABCD":
        apply(("Ġ", letter))
    for _ in range(n):
        counts: Counter = Counter()
        for w, parts in split.items():
            for pair in zip(parts, parts[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        best = max(counts.values())
        apply(min(p for p, c in counts.items() if c == best))
    return out


def tokenizer():
    """A ``PreTrainedTokenizerFast`` that adds ``<s>`` in front of every text (``add_special_tokens=True``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    pairs = merges()
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def model(vocab_size: int, seed: int = 0, max_positions: int = 4096):
    """A 2-layer Llama; every parameter drawn from one seeded generator, in parameter order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=g)
            elif name == "lm_head.weight":
                p.normal_(0.0, 3.0 / math.sqrt(p.shape[1]), generator=g)  # logits of std about 3
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
    lm.generation_config.bos_token_id, lm.generation_config.eos_token_id = 0, 1
    lm.generation_config.pad_token_id = None
    return lm.eval()


def build(seed: int = 0):
    """``(model, tokenizer)``, the same on every call."""
    tok = tokenizer()
    return model(len(tok), seed), tok


def save(folder, seed: int = 0) -> None:
    """Write the model and tokenizer as a Hugging Face folder (for lm-eval's ``pretrained=``)."""
    lm, tok = build(seed)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
