"""GLUE tasks: official metrics, the eight official TSV layouts, errors naming file and line, the Hub
mapping, fixed training subsets, the shared data's row counts, and every task end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from speft import registry
from speft.config import validate
from speft.tasks import base
from speft.tasks.base import DataError
from speft.tasks.glue import LAYOUTS, GlueConfig

from .conftest import ROOT, compose_cfg

SHARED = (ROOT / ".." / "shared" / "data").resolve()
TASKS = sorted(LAYOUTS)


def task(short: str, data_dir, **cfg):
    entry = registry.get("task", f"glue/{short}")
    return entry.obj(GlueConfig(name=f"glue/{short}", **cfg), data_dir)


# ----------------------------------------------------------------------------------------------
# Metrics against hand computations and scikit-learn / scipy


PREDS = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1])
GOLD = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0, 0])  # tp 4, fp 2, fn 1, tn 3


def test_accuracy_f1_and_matthews_match_the_definitions():
    from sklearn.metrics import f1_score, matthews_corrcoef

    tp, fp, fn, tn = 4, 2, 1, 3
    assert base.accuracy(PREDS, GOLD) == pytest.approx(7 / 10)
    assert base.f1(PREDS, GOLD) == pytest.approx(2 * tp / (2 * tp + fp + fn)) == pytest.approx(f1_score(GOLD, PREDS))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert base.matthews_correlation(PREDS, GOLD) == pytest.approx(mcc)
    assert base.matthews_correlation(PREDS, GOLD) == pytest.approx(matthews_corrcoef(GOLD, PREDS))
    # torch tensors work the same; f1 is on the positive class (swapping classes changes it)
    assert base.f1(torch.tensor(PREDS), torch.tensor(GOLD)) == pytest.approx(8 / 11)
    assert base.f1(1 - PREDS, 1 - GOLD) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def test_degenerate_predictions_follow_sklearn():
    assert base.matthews_correlation(np.ones(6, int), np.array([0, 1, 0, 1, 1, 0])) == 0.0  # constant -> 0
    assert base.f1(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positive predicted nor gold
    assert base.matthews_correlation(np.array([0, 1, 1, 0]), np.array([1, 0, 0, 1])) == pytest.approx(-1.0)


def _ranks(x):
    """Average ranks (1-based) by brute force: ties share the mean of their positions."""
    return np.array([np.mean([1 + sum(x < v) + k for k in range(sum(x == v))]) for v in x], dtype=float)


def test_pearson_and_spearman_match_brute_force_and_scipy():
    from scipy.stats import pearsonr, spearmanr

    preds = np.array([0.1, 2.5, 2.5, 4.0, 3.2, 1.0, 4.9])
    gold = np.array([0.0, 2.0, 3.0, 5.0, 3.0, 1.6, 4.2])
    p = ((preds - preds.mean()) * (gold - gold.mean())).sum() / np.sqrt(
        ((preds - preds.mean()) ** 2).sum() * ((gold - gold.mean()) ** 2).sum())
    rp, rg = _ranks(preds), _ranks(gold)
    s = np.corrcoef(rp, rg)[0, 1]
    assert base.pearson(preds, gold) == pytest.approx(p) == pytest.approx(pearsonr(preds, gold)[0])
    assert base.spearman(preds, gold) == pytest.approx(s) == pytest.approx(spearmanr(preds, gold)[0])
    assert math.isnan(base.pearson(np.full(5, 2.0), gold[:5]))  # undefined for a constant input: NaN, as scipy
    assert math.isnan(base.spearman(preds[:5], np.full(5, 3.0)))


def test_compute_metrics_per_task():
    logits = torch.tensor([[0.0, 1.0] if p else [1.0, 0.0] for p in PREDS])
    labels = torch.tensor(GOLD)
    mrpc = task("mrpc", None).compute_metrics(logits, labels)
    assert mrpc == pytest.approx({"f1": 8 / 11, "accuracy": 0.7, "combined_score": (8 / 11 + 0.7) / 2})
    assert set(task("qqp", None).compute_metrics(logits, labels)) == {"f1", "accuracy", "combined_score"}
    assert task("cola", None).compute_metrics(logits, labels) == pytest.approx(
        {"matthews_correlation": base.matthews_correlation(PREDS, GOLD)})
    assert task("rte", None).compute_metrics(logits, labels) == {"accuracy": pytest.approx(0.7)}
    mnli = task("mnli", None).compute_metrics(torch.eye(3)[[0, 1, 2, 2]], torch.tensor([0, 1, 1, 2]))
    assert mnli == {"accuracy": 0.75}
    scores, gold = torch.tensor([[0.5], [1.5], [4.0], [3.0]]), torch.tensor([0.2, 2.0, 4.5, 2.5])
    stsb = task("stsb", None).compute_metrics(scores, gold)
    assert stsb["pearson"] == pytest.approx(base.pearson(scores[:, 0], gold))
    assert stsb["spearman"] == pytest.approx(1.0)
    assert stsb["combined_score"] == pytest.approx((stsb["pearson"] + 1.0) / 2)


def test_task_attributes():
    attrs = {s: task(s, None) for s in TASKS}
    assert {s: t.main_metric for s, t in attrs.items()} == {
        "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "combined_score", "stsb": "combined_score",
        "qqp": "combined_score", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    assert attrs["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert attrs["mnli"].validation_split == "validation_matched" and attrs["mnli"].num_labels == 3
    assert attrs["stsb"].num_labels == 1 and attrs["stsb"].regression
    assert all(t.eval_splits == ("validation",) == (t.validation_split,) for s, t in attrs.items() if s != "mnli")
    assert attrs["qnli"].text_fields == ("question", "sentence") and attrs["cola"].text_fields == ("sentence",)


# ----------------------------------------------------------------------------------------------
# Crafted files in the official layouts

WORDS = "the a film cat runs slowly good bad quite never blue river \" seven old tall".split()
MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1"]


def sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n)) + f" {i} ."


def official_rows(short: str, split: str, n: int) -> tuple[list[str] | None, list[list[str]]]:
    """Header and rows of a GLUE file as the download script lays it out."""
    s1 = lambda i: sentence(i)  # noqa: E731
    s2 = lambda i: sentence(i + 101, 4)  # noqa: E731
    nli = ("entailment", "not_entailment")
    if short == "cola":
        return None, [["gj04", str(i % 2), "" if i % 2 else "*", s1(i)] for i in range(n)]
    if short == "sst2":
        return ["sentence", "label"], [[s1(i) + " ", str(i % 2)] for i in range(n)]
    if short == "mrpc":
        return (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                [[str(i % 2), str(1000 + i), str(2000 + i), s1(i), s2(i)] for i in range(n)])
    if short == "stsb":
        return (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                 "score"],
                [[str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1(i), s2(i),
                  f"{(i * 0.7) % 5:.3f}"] for i in range(n)])
    if short == "qqp":
        return (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                [[str(i), str(2 * i), str(2 * i + 1), s1(i) + "?", s2(i) + "?", str(i % 2)] for i in range(n)])
    if short == "mnli":
        labels = ("entailment", "neutral", "contradiction")
        extra = [] if split == "train" else ["label2", "label3", "label4", "label5"]
        return ([*MNLI_HEAD, *extra, "gold_label"],
                [[str(i), str(i), f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1(i), s2(i),
                  labels[i % 3], *[labels[i % 3]] * len(extra), labels[i % 3]] for i in range(n)])
    if short == "qnli":
        return ["index", "question", "sentence", "label"], [[str(i), s1(i) + "?", s2(i), nli[i % 2]] for i in range(n)]
    return ["index", "sentence1", "sentence2", "label"], [[str(i), s1(i), s2(i), nli[i % 2]] for i in range(n)]


def write_glue(root: Path, short: str, n_train: int = 24, n_dev: int = 8) -> Path:
    """``<root>/glue/<DIR>/...tsv`` in the official layout (MRPC with a byte-order mark)."""
    layout = LAYOUTS[short]
    folder = root / "glue" / layout.dir
    folder.mkdir(parents=True, exist_ok=True)
    for split, file in layout.files.items():
        header, rows = official_rows(short, split, n_train if split == "train" else n_dev)
        lines = ([header] if header else []) + rows
        text = "".join("\t".join(r) + "\n" for r in lines)
        (folder / file).write_text(("\ufeff" if short == "mrpc" else "") + text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("short", TASKS)
def test_reads_each_official_layout(tmp_path, short):
    write_glue(tmp_path, short, n_train=12, n_dev=6)
    t = task(short, tmp_path, source="local")
    splits = t.load_splits()
    assert set(splits) == set(LAYOUTS[short].files) and len(splits["train"]) == 12
    assert all(len(rows) == 6 for name, rows in splits.items() if name != "train")
    row = splits["train"][1]
    assert set(row) == {*t.text_fields, "label"}
    assert row[t.text_fields[0]].startswith(sentence(1))  # the text, stray " included, unquoted
    assert '"' in " ".join(r[t.text_fields[0]] for r in splits["train"])
    if short == "stsb":
        assert row["label"] == pytest.approx(0.7) and all(isinstance(r["label"], float) for r in splits["train"])
    else:
        assert all(isinstance(r["label"], int) and 0 <= r["label"] < t.num_labels for r in splits["train"])
        assert len({r["label"] for r in splits["train"]}) == t.num_labels
    if short in ("rte", "qnli"):
        assert [r["label"] for r in splits["train"][:2]] == [0, 1]  # entailment = 0, as the Hub's ClassLabel
    if short == "mnli":
        assert [r["label"] for r in splits["validation_mismatched"][:3]] == [0, 1, 2]


def test_mrpc_byte_order_mark_and_quotes(tmp_path):
    folder = write_glue(tmp_path, "mrpc", 4, 4)
    assert (folder / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    with open(folder / "dev.tsv", "a", encoding="utf-8") as f:
        f.write('1\t5\t6\t" The pie business does not fit .\tHe said " 100 percent " behind .\n')
    rows = task("mrpc", tmp_path).load_splits()["validation"]
    assert rows[-1] == {"sentence1": '" The pie business does not fit .',
                        "sentence2": 'He said " 100 percent " behind .', "label": 1}


@pytest.mark.parametrize("short,file,line,bad,expected", [
    ("rte", "train.tsv", 3, "2\tonly two columns\n", "expected 4 tab-separated columns, found 2"),
    ("qnli", "dev.tsv", 4, "9\tWhy?\tBecause.\tmaybe\n", "unknown label 'maybe'"),
    ("stsb", "dev.tsv", 2, "0\tg\tf\ty\t0\ts\ts\tA man .\tA dog .\tn/a\n", "score 'n/a' is not a number"),
    ("stsb", "train.tsv", 5, "0\tg\tf\ty\t0\ts\ts\tA man .\tA dog .\t7.5\n", "outside [0, 5]"),
    ("sst2", "train.tsv", 6, "  \t1\n", "empty sentence"),
    ("cola", "train.tsv", 2, "gj04\t1\tOnly three columns\n", "expected 4 tab-separated columns"),
    ("mnli", "dev_matched.tsv", 3, "\t".join(["x"] * 15 + ["-"]) + "\n", "unknown label '-'"),
    ("qqp", "train.tsv", 7, "5\t10\t11\tWhy?\t\t0\n", "empty question2"),
])
def test_malformed_row_names_file_and_line(tmp_path, short, file, line, bad, expected):
    folder = write_glue(tmp_path, short, 8, 6)
    path = folder / file
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(line - 1, bad)
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        task(short, tmp_path).load_splits()
    message = str(info.value)
    assert str(path) in message and f"line {line}:" in message and expected in message, message
    # opt-in: the row is dropped with a warning, the others are kept
    splits = task(short, tmp_path, skip_malformed=True).load_splits()
    assert len(splits["train"]) == 8 and len(splits["validation_matched" if short == "mnli" else "validation"]) == 6


def test_missing_header_column_and_missing_split(tmp_path):
    folder = write_glue(tmp_path, "mnli", 6, 3)
    (folder / "dev_mismatched.tsv").unlink()
    with pytest.raises(DataError, match="validation_mismatched split is missing") as info:
        task("mnli", tmp_path).load_splits()
    assert str(folder / "dev_mismatched.tsv") in str(info.value) and "nyu-mll/glue" in str(info.value)
    folder = write_glue(tmp_path, "rte", 4, 3)
    (folder / "dev.tsv").write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match="line 1: the header lacks column"):
        task("rte", tmp_path).load_splits()


class FakeSplit:
    def __init__(self, rows):
        self.rows = rows

    def select_columns(self, keep):
        return [{k: r[k] for k in keep} for r in self.rows]


def test_hub_rows_map_to_the_same_fields(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name, revision=None):
        calls.append((path, name, revision))
        ex = lambda i, label: {"premise": f"p{i}", "hypothesis": f"h{i}", "label": label, "idx": i}  # noqa: E731
        return {"train": FakeSplit([ex(0, 2), ex(1, 0)]), "validation_matched": FakeSplit([ex(2, 1)]),
                "validation_mismatched": FakeSplit([ex(3, 0)]), "test_matched": FakeSplit([ex(4, -1)])}

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = task("mnli", tmp_path).load_splits()  # auto: no local folder -> the Hub
    assert calls == [("nyu-mll/glue", "mnli", None)]
    assert splits == {"train": [{"premise": "p0", "hypothesis": "h0", "label": 2},
                                {"premise": "p1", "hypothesis": "h1", "label": 0}],
                      "validation_matched": [{"premise": "p2", "hypothesis": "h2", "label": 1}],
                      "validation_mismatched": [{"premise": "p3", "hypothesis": "h3", "label": 0}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {
        s: FakeSplit([{"sentence1": "a", "sentence2": "b", "label": 3.2}]) for s in ("train", "validation")})
    assert task("stsb", tmp_path, source="hub").load_splits()["validation"] == [
        {"sentence1": "a", "sentence2": "b", "label": 3.2}]


def test_offline_hub_error_names_local_path_and_hub_id(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        task("cola", tmp_path).load_splits()
    message = str(info.value)
    assert str(tmp_path / "glue" / "CoLA") in message and "nyu-mll/glue" in message and "'cola'" in message


def test_fixed_training_subset(tmp_path):
    write_glue(tmp_path, "sst2", 40, 4)
    full = task("sst2", tmp_path).splits()["train"]
    assert task("sst2", tmp_path, max_train_examples=5).splits()["train"] == full[:5]  # no seed: first rows
    a = task("sst2", tmp_path, max_train_examples=10, subset_seed=3).splits()["train"]
    assert a == task("sst2", tmp_path, max_train_examples=10, subset_seed=3).splits()["train"]  # reproducible
    assert a != full[:10] and all(r in full for r in a) and len({r["sentence"] for r in a}) == 10
    assert task("sst2", tmp_path, max_train_examples=4, subset_seed=3).splits()["train"] == a[:4]  # nested
    assert task("sst2", tmp_path, max_train_examples=10, subset_seed=4).splits()["train"] != a
    assert task("sst2", tmp_path, subset_seed=3).splits()["train"] == full  # no cap: all rows, file order


def test_task_max_length_and_float_labels_in_batches(tmp_path):
    from transformers import DataCollatorWithPadding

    from speft.models.loading import load_tokenizer

    tok = load_tokenizer(compose_cfg().model)
    rows = [{"sentence1": "word " * 300, "sentence2": "other " * 300, "label": 3.0},
            {"sentence1": "short", "sentence2": "pair", "label": 1.25}]
    stsb = task("stsb", tmp_path, max_length=196)
    enc = stsb.encode(tok, rows)
    assert len(enc[0]["input_ids"]) == 196 and len(enc[1]["input_ids"]) < 10  # task.max_length truncates
    assert len(task("stsb", tmp_path).encode(tok, rows)[0]["input_ids"]) == 128  # the schema's default
    batch = DataCollatorWithPadding(tok, return_tensors="pt")(enc)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.0, 1.25]
    enc = task("rte", tmp_path).encode(tok, [{"sentence1": "a", "sentence2": "b", "label": 1}], 128)
    assert DataCollatorWithPadding(tok, return_tensors="pt")(enc)["labels"].dtype == torch.int64


@pytest.mark.skipif(not (SHARED / "glue").is_dir(), reason="no shared GLUE copy at ../shared/data")
@pytest.mark.parametrize("short,counts", [
    ("sst2", {"train": 67_349, "validation": 872}),
    ("mrpc", {"train": 3_668, "validation": 408}),
    ("rte", {"train": 2_490, "validation": 277}),
    ("qnli", {"validation": 5_463}),
])
def test_shared_data_row_counts(short, counts):
    from speft.tasks.glue import read_tsv

    layout = LAYOUTS[short]
    for split, n in counts.items():
        assert len(read_tsv(SHARED / "glue" / layout.dir / layout.files[split], layout)) == n


# ----------------------------------------------------------------------------------------------
# End to end under debug=fast


@pytest.mark.parametrize("short", TASKS)
def test_every_glue_task_runs_end_to_end(tmp_path, short):
    from speft.pipeline import run
    from speft.results import RESULTS_FILE

    write_glue(tmp_path / "data", short)
    overrides = ["debug=fast", "logger=none", f"task=glue/{short}", f"paths.data_dir={tmp_path / 'data'}",
                 "trainer.batch_size=8", "task.max_length=32"]
    t = registry.get("task", f"glue/{short}").obj(validate(compose_cfg(*overrides)).task, None)
    run(compose_cfg(*overrides), run_dir=tmp_path / "run")
    data = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert data["status"] == "completed", data.get("error")
    names = [*LAYOUTS[short].metrics, *(["combined_score"] if len(LAYOUTS[short].metrics) > 1 else [])]
    for split in t.eval_splits:
        for name in names:
            assert math.isfinite(data["metrics"][f"{split}/{name}"]), (split, name, data["metrics"])
    assert f"{t.validation_split}/{t.main_metric}" in data["metrics"]
