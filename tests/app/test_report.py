"""Run artefacts: distinct-n by hand, the metrics log."""

import pytest
import torch

from minippo.app.report import MetricsLog, distinct_n


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)  # {1, 2, 3} of 7 tokens
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)  # (1,2) x3, (2,3), (3,1): 3 unique of 5
    assert distinct_n([[5, 6, 7]], 2) == 1.0
    assert distinct_n([[5]], 2) == 0.0  # no bigram at all
    tensors = [torch.tensor(s) for s in seqs]  # token tensors, as generate() returns them
    assert distinct_n(tensors, 1) == distinct_n(seqs, 1) and distinct_n(tensors, 2) == distinct_n(seqs, 2)


def test_metrics_log_appends_and_reads(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "x": float("nan")})
    log.write({"step": 2, "x": 1.5})
    assert log.read() == [{"step": 1, "x": None}, {"step": 2, "x": 1.5}]
