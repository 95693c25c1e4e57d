"""The two request types of lm-evaluation-harness, on any Hugging Face causal LM: greedy generation until
a stop string (``generate_until``) and the log-likelihood of a continuation given a context
(``loglikelihood``).

Followed from lm-evaluation-harness 0.4.13, ``lm_eval/models/huggingface.py`` (class ``HFLM``, run with
its defaults: ``add_bos_token`` unset, ``logits_cache=True``, no chat template), ``lm_eval/api/model.py``
(``TemplateLM``) and ``lm_eval/models/utils.py``:

- Special tokens (BOS): the tokenizer decides. ``HFLM`` encodes with the tokenizer's default
  ``add_special_tokens``, so a tokenizer whose post-processor adds a BOS (Gemma, Llama, OPT) gets it, one
  that adds none (SmolLM2, GPT-2) gets none; a text that already starts with the BOS text is encoded with
  ``add_special_tokens=False``, so the BOS is never doubled. :func:`encode` is ``tok_encode`` (the prefix
  checked is the decoded ``prefix_token_id``: BOS, else EOS); :func:`encode_prompt` is one row of
  ``tok_batch_encode`` (the prefix checked is ``tokenizer.bos_token``). The harness's
  ``add_bos_token=True/False`` is ``add_special_tokens=True/False`` here.
- ``max_length``: ``resolve_max_length``: the first of ``n_positions``, ``max_position_embeddings``,
  ``n_ctx`` in the model config (its ``text_config`` if it has one), else the tokenizer's
  ``model_max_length``, else 2048.
- ``generate_until``: requests sorted longest first by ``tok_encode`` length, ties by the prompt text
  (the ``Collator`` key ``(-len(toks), context)``), batched with left padding; contexts left-truncated to
  ``max_length - max_gen_toks``; greedy ``model.generate`` with the KV cache and a stop-sequence
  criterion; the EOS token is added to the stop strings; the completion is decoded with
  ``skip_special_tokens=True`` and cut at every stop string (``s = s.split(term)[0]``); results are put
  back in input order.
- ``loglikelihood``: an empty context becomes ``[prefix_token_id]`` (BOS, else EOS) and the continuation
  is encoded without special tokens; otherwise ``_encode_pair``: trailing whitespace of the context moves
  to the continuation; ``whole = tok_encode(context + continuation)``, ``context_enc = tok_encode(context)``,
  ``continuation_enc = whole[len(context_enc):]`` (so a tokenizer's BOS sits at the start of the context).
- ``_loglikelihood_tokens``: the model reads ``(context_enc + continuation_enc)[-(max_length + 1):][:-1]``
  (left truncation), batches are right-padded, and the score is the sum of the log-softmax of the
  continuation tokens at the positions that predict them.

What is equal, checked against lm-eval 0.4.13 itself in ``tests/test_eval_lm_eval_reference.py`` (a tiny
Llama whose tokenizer adds BOS, and the packaged SmolLM2-135M): token ids of every prompt and request,
prompts, completions (byte-identical) and log-likelihoods (within 1e-4). Where this differs by design: the
harness decides special tokens once per generation batch from its first prompt (a later prompt that
starts with the BOS text would get a second BOS); here each prompt decides for itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # the harness's HFLM._DEFAULT_MAX_LENGTH
HUGE_MODEL_MAX_LENGTH = 1000000000000000019884624838656  # transformers' "no limit" sentinel


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def max_positions(model: nn.Module, tokenizer=None) -> int:
    """The harness's ``HFLM.max_length`` (``resolve_max_length``): the model's context window in tokens."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit != HUGE_MODEL_MAX_LENGTH:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, falling back to EOS (the tokenizer itself is not changed)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` inside; the model's training mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def prefix_token_id(tokenizer) -> int | None:
    """The harness's ``prefix_token_id``: BOS, else EOS (the context of an empty-context request)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _special_tokens(text: str, prefix: str | None, add_special_tokens: bool | None) -> dict:
    """Keyword for the tokenizer: forced, or none (its own default) unless ``text`` starts with ``prefix``."""
    if add_special_tokens is not None:
        return {"add_special_tokens": add_special_tokens}
    if prefix and text.startswith(prefix):  # already has its BOS: never a second one
        return {"add_special_tokens": False}
    return {}


def encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """The harness's ``tok_encode``: ``None`` lets the tokenizer add its special tokens (BOS), unless the
    text already starts with the decoded ``prefix_token_id``; ``True``/``False`` force them."""
    prefix_id = prefix_token_id(tokenizer)
    prefix = tokenizer.decode(prefix_id) if add_special_tokens is None and prefix_id is not None else None
    return list(tokenizer(text, **_special_tokens(text, prefix, add_special_tokens))["input_ids"])


def encode_prompt(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """A generation prompt as one row of the harness's ``tok_batch_encode``: as :func:`encode`, but the
    prefix that turns special tokens off is ``tokenizer.bos_token`` (the harness checks it per batch)."""
    return list(tokenizer(text, **_special_tokens(text, tokenizer.bos_token, add_special_tokens))["input_ids"])


def length_order(lengths: Sequence[int], ties: Sequence | None = None) -> list[int]:
    """Indices, longest first: the harness's ``Collator`` sort key ``(-len(toks), ties)``; without
    ``ties``, equal lengths keep input order."""
    if ties is None:
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], ties[i]))


def padded(seqs: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``seqs`` padded to the longest, on the left or the right."""
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, q in enumerate(seqs):
        cols = slice(width - len(q), width) if left else slice(0, len(q))
        ids[row, cols] = torch.tensor(q, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


# --------------------------------------------------------------------------- generation


class StopOnStrings:
    """Per-row stopping criterion: a row is done once its generated text contains a stop string.

    Like the harness's ``MultiTokenEOSCriteria`` it decodes only the last few generated tokens
    (enough to hold the longest stop string), but it reports each row separately, so ``generate``
    pads finished rows and stops when all are done. The completion is cut at the first stop string
    afterwards, so this only saves compute and never changes the result."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_length = prompt_length
        longest = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in self.stops), default=0)
        self.lookback = longest + 2  # as the harness: the stop string's token count plus 2

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:][:, -self.lookback:]
        texts = self.tokenizer.batch_decode(generated.tolist())
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The harness's post-hoc cut: ``for term in until: s = s.split(term)[0]``."""
    for term in stops:
        if term:
            text = text.split(term)[0]
    return text


def generate_until(model: nn.Module, tokenizer, prompts: Sequence[str], *, stop: Sequence[str],
                   max_new_tokens: int = 256, batch_size: int = 8, device=None, max_context: int | None = None,
                   add_special_tokens: bool | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (input order), cut at the first stop string or EOS.

    ``max_context`` is the harness's ``max_length`` (context plus generation; default: the model's
    positions): prompts are left-truncated to ``max_context - max_new_tokens`` tokens.
    ``add_special_tokens``: ``None`` (the harness's default) lets the tokenizer add its BOS, once."""
    from transformers import StoppingCriteriaList

    device = device or model_device(model)
    max_context = max_context or max_positions(model, tokenizer)
    keep = max(max_context - max_new_tokens, 1)
    pad = pad_token_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    stops = list(stop)
    if tokenizer.eos_token:  # the harness adds the EOS string to `until`
        stops.append(tokenizer.eos_token)

    encoded = [encode_prompt(tokenizer, p, add_special_tokens)[-keep:] for p in prompts]
    # the harness sorts by the untruncated `tok_encode` length, ties by the prompt text
    order = length_order([len(encode(tokenizer, p, add_special_tokens)) for p in prompts], ties=list(prompts))
    out: list[str] = [""] * len(prompts)
    with evaluating(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = padded([encoded[i] for i in idx], pad, left=True)
            width = ids.shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stops, width)])
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       pad_token_id=pad, stopping_criteria=criteria, use_cache=True)
            for row, i in enumerate(idx):
                tokens = generated[row, width:].tolist()
                tokens = _until_eos(tokens, eos_ids)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                out[i] = cut_at_stops(text, stops)
            done = start + len(idx)
            if done * 10 // len(order) > start * 10 // len(order):  # about every 10%
                log.info("generated %d/%d completions", done, len(order))
    return out


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens before the first EOS: what follows it is padding (``generate`` pads finished rows)."""
    for j, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:j]
    return tokens


# --------------------------------------------------------------------------- log-likelihood


def encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool | None = None
                ) -> tuple[list[int], list[int]]:
    """The harness's ``_encode_pair`` (non-empty context): with a BOS-adding tokenizer the BOS opens
    ``context_enc`` and ``continuation_enc`` has none."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation, add_special_tokens)
    context_enc = encode(tokenizer, context, add_special_tokens)
    return context_enc, whole[len(context_enc):]


def encode_request(tokenizer, context: str, continuation: str, add_special_tokens: bool | None = None
                   ) -> tuple[list[int], list[int]]:
    """The harness's ``loglikelihood`` tokenisation: an empty context is ``[prefix_token_id]`` (unless the
    continuation already starts with it), otherwise :func:`encode_pair`."""
    if context == "":
        continuation_enc = encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_enc and prefix == continuation_enc[0]:
            return continuation_enc[:1], continuation_enc[1:]
        return ([prefix] if prefix is not None else []), continuation_enc
    return encode_pair(tokenizer, context, continuation, add_special_tokens)


def score_positions(model: nn.Module, rows: Sequence[Sequence[int]], targets: Sequence[Sequence[tuple[int, int]]],
                    *, pad: int, batch_size: int, device) -> list[list[float]]:
    """Log-probabilities ``log p(token | row[:position + 1])`` for each ``(position, token)`` of each row.

    Rows are batched longest first with right padding (as the harness); only the logits of the
    positions asked for are computed (``logits_to_keep``), so memory does not grow with vocab x length.
    The caller must run this inside :func:`evaluating`."""
    out: list[list[float]] = [[] for _ in rows]
    order = length_order([len(r) for r in rows])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = padded([rows[i] for i in idx], pad, left=False)
        positions = sorted({p for i in idx for p, _ in targets[i]})
        column = {p: c for c, p in enumerate(positions)}
        logits = _logits_at(model, ids.to(device), mask.to(device), positions)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        at = torch.tensor([(r, column[p], tok) for r, i in enumerate(idx) for p, tok in targets[i]],
                          dtype=torch.long, device=logprobs.device).reshape(-1, 3)
        picked = logprobs[at[:, 0], at[:, 1], at[:, 2]].tolist()  # one host transfer per batch, not one per token
        for i in idx:
            out[i], picked = picked[: len(targets[i])], picked[len(targets[i]):]
    return out


def _logits_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Logits ``[batch, len(positions), vocab]`` at the given sequence positions."""
    keep = torch.tensor(positions, dtype=torch.long, device=ids.device)
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
    except TypeError:  # a model without `logits_to_keep`: full logits, then select
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, keep]
    if logits.shape[1] == len(positions):
        return logits
    return logits[:, keep]


def loglikelihood(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 8,
                  device=None, max_context: int | None = None, add_special_tokens: bool | None = None
                  ) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context`` (the harness's general path).

    ``max_context`` is the harness's ``max_length`` (default: the model's positions).
    ``add_special_tokens``: ``None`` (the harness's default) lets the tokenizer add its BOS, once."""
    device = device or model_device(model)
    max_context = max_context or max_positions(model, tokenizer)
    rows, targets = [], []
    for context, continuation in requests:
        context_enc, continuation_enc = encode_request(tokenizer, context, continuation, add_special_tokens)
        if not context_enc or not continuation_enc:
            raise ValueError(f"empty context or continuation after tokenisation: {(context, continuation)!r}")
        row, target = pair_row(context_enc, continuation_enc, max_context)
        rows.append(row)
        targets.append(target)
    with evaluating(model):
        scores = score_positions(model, rows, targets, pad=pad_token_id(tokenizer), batch_size=batch_size,
                                 device=device)
    return [sum(s) for s in scores]


def pair_row(context_enc: list[int], continuation_enc: list[int], max_context: int
             ) -> tuple[list[int], list[tuple[int, int]]]:
    """Model input and ``(position, token)`` targets of one request, left-truncated as the harness."""
    if len(continuation_enc) > max_context:
        raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds max_context={max_context}")
    row = (context_enc + continuation_enc)[-(max_context + 1):][:-1]
    first = len(row) - len(continuation_enc)  # position predicting the first continuation token
    return row, [(first + j, tok) for j, tok in enumerate(continuation_enc)]
