"""Run artefacts: distinct-n and the repeated n-grams per sequence by hand, the KL-regularised
optimum, the metrics log."""

import math

import pytest
import torch

from minippo.app.report import MetricsLog, distinct_n, kl_regularised_optimum, repeated_ngram_share


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)  # {1, 2, 3} of 7 tokens
    assert distinct_n(seqs, 2) == pytest.approx(3 / 5)  # (1,2) x3, (2,3), (3,1): 3 unique of 5
    assert distinct_n([[5, 6, 7]], 2) == 1.0
    assert distinct_n([[5]], 2) == 0.0  # no bigram at all
    tensors = [torch.tensor(s) for s in seqs]  # token tensors, as generate() returns them
    assert distinct_n(tensors, 1) == distinct_n(seqs, 1) and distinct_n(tensors, 2) == distinct_n(
        seqs, 2
    )


def test_repeated_ngram_share_by_hand():
    seqs = [[1, 2, 3, 1, 2], [1, 2], [7, 8, 9], [4]]
    # (1,2) twice in the first and once in the second: 2 of its 4 bigrams and 1 of 1 are repeated;
    # (2,3), (3,1) and the third's bigrams occur once; the fourth has no bigram
    assert repeated_ngram_share(seqs, 2) == [0.5, 1.0, 0.0, 0.0]
    assert repeated_ngram_share(seqs, 1) == [0.8, 1.0, 0.0, 0.0]  # tokens 1 and 2 recur
    assert repeated_ngram_share([torch.tensor(s) for s in seqs], 2) == repeated_ngram_share(seqs, 2)
    # its mean weighs each sequence alike; 1 - distinct-2 counts every n-gram alike
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5 and repeated_ngram_share([[1, 2], [1, 2]]) == [
        1.0,
        1.0,
    ]


def test_metrics_log_appends_and_reads(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "x": float("nan")})
    log.write({"step": 2, "x": 1.5})
    assert log.read() == [{"step": 1, "x": None}, {"step": 2, "x": 1.5}]


def test_kl_regularised_optimum_is_the_best_trade_of_score_against_kl():
    scores = torch.tensor([[0.0, 1.0, 3.0, 3.0], [-2.0, 0.5, 0.5, 1.0]])
    n = scores.shape[1]
    # A large beta keeps the base's samples (uniform, no KL); a small one takes the best ones.
    w, kl = kl_regularised_optimum(scores, beta=1e4)
    assert torch.allclose(w, torch.full_like(w, 1 / n), atol=1e-3) and kl.abs().max() < 1e-6
    w, kl = kl_regularised_optimum(scores, beta=1e-3)
    assert torch.allclose(w[0], torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=w.dtype))  # ties share
    assert kl[0] == pytest.approx(math.log(2)) and kl[1] == pytest.approx(math.log(n))
    # At beta = 0.5 its objective is beta * log mean exp(score / beta), and no other weights beat it.
    beta = 0.5
    w, kl = kl_regularised_optimum(scores, beta)
    value = (w * scores).sum(1) - beta * kl
    assert torch.allclose(
        value, beta * torch.logsumexp(scores.double() / beta, 1) - beta * math.log(n)
    )
    other = (
        torch.rand(200, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1e-3
    )
    other = other / other.sum(1, keepdim=True)  # 200 other weightings of the n samples
    for row in range(2):
        other_kl = (other * torch.log(n * other)).sum(1)
        assert ((other * scores[row]).sum(1) - beta * other_kl).max() < value[row]


def test_kl_regularised_optimum_needs_a_positive_beta():
    with pytest.raises(ValueError, match="beta must be > 0"):
        kl_regularised_optimum(torch.zeros(1, 2), 0.0)


def test_machine_description_names_the_cpu_and_the_compute_path(monkeypatch):
    """Every published time names its machine: the CPU, its threads, its kernel flags, and an override
    of the native-bf16 probe when one is set."""
    import torch

    from minippo.app.report import cpu_flags, cpu_name, machine_description

    where = machine_description("cpu")
    assert (
        where.startswith(f"{cpu_name()}, ") and f"{torch.get_num_threads()} torch threads" in where
    )
    assert "torch capability" in where and "MINIPPO_CPU_BF16" not in where
    monkeypatch.setenv("MINIPPO_CPU_BF16", "0")
    assert cpu_flags().endswith("(MINIPPO_CPU_BF16=0: native bf16 taken as False)")
