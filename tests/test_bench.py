"""The efficiency benchmark runs every method in its own process at equal trainable counts."""

from __future__ import annotations

from speft.bench import METHODS, main


def test_bench_reports_every_method_with_matched_counts(capsys):
    rows = main(["--shape", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0", "--rank", "2",
                 "--device", "cpu"])
    by = {r["method"]: r for r in rows}
    assert set(by) == set(METHODS) and not any("error" in r for r in rows)
    # LoRA rank 2 on q,k,v,o,gate,up,down of 2 layers: r·(in+out) summed
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    expected = 2 * 2 * sum(o + i for o, i in shapes)
    assert by["sparse"]["trainable"] == by["lora"]["trainable"] == expected
    assert by["frozen"]["trainable"] == 0 and by["full"]["trainable"] > expected
    assert by["lora"]["step_vs_lora"] == 1.0 and by["sparse"]["memory_vs_lora"] > 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(METHODS)  # one JSON line per method
