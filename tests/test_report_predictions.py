"""The paired comparison of two runs' predictions files (speft.report.predictions) against hand counts."""

from __future__ import annotations

import json

import pytest
import torch

from speft.report.predictions import main, paired, read_predictions
from speft.tasks.base import ClassificationTask, TaskConfig

LABELS = [1, 0, 0, 1, 1, 0, 1, 1]
A = [1, 0, 1, 1, 1, 0, 0, 1]  # wrong on 2 and 6
B = [1, 1, 0, 1, 0, 0, 1, 0]  # wrong on 1, 4 and 7


def write_run(folder, labels, preds, split="validation"):
    folder.mkdir()
    rows = [{"index": i, "label": y, "prediction": p} for i, (y, p) in enumerate(zip(labels, preds))]
    (folder / f"predictions_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_classification_pairs_counted_by_hand(tmp_path):
    a = read_predictions(write_run(tmp_path / "a", LABELS, A), "validation")
    b = read_predictions(write_run(tmp_path / "b", LABELS, B), "validation")
    out = paired(a, b)
    assert (out["correct_a"], out["correct_b"], out["differ"]) == (6, 5, 5)
    assert (out["only_a"], out["only_b"]) == (3, 2)  # 1, 4, 7 right in A only; 2, 6 right in B only
    assert out["mcnemar_p"] == pytest.approx(1.0)  # 3 vs 2 of 5 discordant: the binomial's two sides cover all
    same = paired(a, a)
    assert (same["differ"], same["only_a"], same["only_b"], same["mcnemar_p"]) == (0, 0, 0, 1.0)
    skewed = paired(a, read_predictions(write_run(tmp_path / "c", LABELS, [1 - y for y in LABELS]), "validation"))
    assert (skewed["only_a"], skewed["only_b"]) == (6, 0)
    assert skewed["mcnemar_p"] == pytest.approx(2 * 0.5 ** 6)  # exact two-sided binomial, 6 of 6


def test_regression_pairs(tmp_path):
    labels = [0.5, 2.0, 4.5, 3.0]
    a = read_predictions(write_run(tmp_path / "a", labels, [0.4, 2.2, 4.0, 3.1]), "validation")
    b = read_predictions(write_run(tmp_path / "b", labels, [0.6, 2.0, 4.4, 2.9]), "validation")
    out = paired(a, b)
    assert out["mean_abs_difference"] == pytest.approx((0.2 + 0.2 + 0.4 + 0.2) / 4)
    assert 0.95 < out["pearson"] <= 1.0


def test_records_come_back_in_file_order():
    """Logit rows arrive sorted by length; index puts each back at its place in the split."""
    task = ClassificationTask(TaskConfig(name="t"))
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # predictions 1, 0, 1
    rows = task.prediction_records(logits, torch.tensor([1, 1, 0]), index=[2, 0, 1])
    assert rows == [{"index": 0, "label": 1, "prediction": 0}, {"index": 1, "label": 0, "prediction": 1},
                    {"index": 2, "label": 1, "prediction": 1}]


def test_errors_name_the_problem(tmp_path):
    run = write_run(tmp_path / "a", LABELS, A)
    with pytest.raises(FileNotFoundError, match=r"predictions_test.jsonl: no predictions file .*has: "
                                                r"predictions_validation.jsonl"):
        read_predictions(run, "test")
    other = read_predictions(write_run(tmp_path / "b", LABELS[:-1], A[:-1]), "validation")
    with pytest.raises(ValueError, match="did not evaluate the same examples"):
        paired(read_predictions(run, "validation"), other)
    (run / "predictions_bad.jsonl").write_text('{"index": 0, "label": 1}\n')
    with pytest.raises(ValueError, match=r"predictions_bad.jsonl:1: not a predictions row: it lacks prediction"):
        read_predictions(run, "bad")
    with pytest.raises(FileNotFoundError, match=r"/nowhere: no such run folder"):
        read_predictions(tmp_path / "nowhere", "validation")


def test_cli_prints_one_row_per_pair(tmp_path, capsys):
    runs = [str(write_run(tmp_path / n, LABELS, p)) for n, p in (("a", A), ("b", B), ("c", LABELS))]
    main(runs)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3 and "McNemar p (exact)" in lines[0]
    assert lines[2].split("|")[3:8] == [" 8 ", " 6 ", " 5 ", " 5 ", " 3 "]
    with pytest.raises(SystemExit):
        main(runs[:1])


def test_regression_records_carry_the_score():
    """STS-B: the model's one output is the prediction (a float), as its Pearson and Spearman see it."""
    from speft import registry
    from speft.tasks.glue import GlueConfig

    task = registry.get("task", "glue/stsb").obj(GlueConfig(name="glue/stsb"), None)
    rows = task.prediction_records(torch.tensor([[3.5], [0.25]]), torch.tensor([4.0, 1.0]), index=[1, 0])
    assert rows == [{"index": 0, "label": 1.0, "prediction": 0.25}, {"index": 1, "label": 4.0, "prediction": 3.5}]
    assert paired(rows, [{**r, "prediction": r["prediction"] + 1} for r in rows])["mean_abs_difference"] == 1.0
