"""The rollout buffer and its minibatch iterator."""

import pytest
import torch

from minippo.rollout import RolloutBuffer


def make_buffer(query_lengths=(3, 1, 2, 3), response_lengths=(2, 4, 1, 2)):
    B, P, T = len(query_lengths), max(query_lengths), max(response_lengths)
    query_mask = (
        torch.arange(P)[None] >= P - torch.tensor(query_lengths)[:, None]
    ).long()  # left-padded
    response_mask = (
        torch.arange(T)[None] < torch.tensor(response_lengths)[:, None]
    ).float()  # right-padded
    sample_id = torch.arange(B, dtype=torch.float32)[:, None]
    per_token = sample_id * 100 + torch.arange(T)  # (B, T): identifies sample and column
    fields = {
        name: per_token.clone()
        for name in ("old_logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns")
    }
    return RolloutBuffer(
        query_ids=(sample_id.long() * 10 + 1) * query_mask,
        query_mask=query_mask,
        response_ids=(sample_id.long() * 10 + 2) * response_mask.long(),
        response_mask=response_mask,
        scores=sample_id[:, 0],
        **fields,
    )


def test_layout():
    buf = make_buffer()
    assert len(buf) == 4
    assert buf.input_ids.shape == (4, 3 + 4)
    assert buf.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert buf.attention_mask[2].tolist() == [0, 1, 1, 1, 0, 0, 0]


def test_minibatches_partition_the_batch():
    buf = make_buffer()
    seen = []
    for mb in buf.minibatches(2, shuffle=True):
        assert len(mb) == 2
        seen += mb.scores.long().tolist()
        # every field of a sample stays together
        for i, s in enumerate(mb.scores.long().tolist()):
            assert mb.values[i, 0] == s * 100 and mb.returns[i, 0] == s * 100
    assert sorted(seen) == [0, 1, 2, 3]


def test_shuffle_order():
    buf = make_buffer(query_lengths=(1,) * 8, response_lengths=(1,) * 8)
    unshuffled = [mb.scores.long().tolist() for mb in buf.minibatches(2, shuffle=False)]
    assert unshuffled == [[0, 1], [2, 3], [4, 5], [6, 7]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [mb.scores.tolist() for mb in buf.minibatches(2, generator=g1)]
    b = [mb.scores.tolist() for mb in buf.minibatches(2, generator=g2)]
    assert a == b  # reproducible with a generator
    orders = {tuple(x for mb in buf.minibatches(8) for x in mb.scores.tolist()) for _ in range(5)}
    assert len(orders) > 1  # a fresh permutation per call
    given = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    assert [mb.scores.long().tolist() for mb in buf.minibatches(4, order=given)] == [
        [7, 6, 5, 4],
        [3, 2, 1, 0],
    ]
    with pytest.raises(ValueError, match="permutation"):
        next(buf.minibatches(4, order=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])))


def test_select_trims_all_padding_columns():
    buf = make_buffer()
    mb = buf.select(torch.tensor([2, 0]))  # queries of length 2 and 3, responses of length 1 and 2
    assert mb.query_ids.shape == (2, 3) and mb.response_ids.shape == (2, 2)
    mb = buf.select(torch.tensor([2]))  # query length 2, response length 1
    assert mb.query_mask.tolist() == [[1, 1]] and mb.response_mask.tolist() == [[1.0]]
    assert mb.values.tolist() == [[200.0]] and mb.scores.tolist() == [2.0]
    # a partially filled buffer (tokens only) selects too
    tokens_only = RolloutBuffer(buf.query_ids, buf.query_mask, buf.response_ids, buf.response_mask)
    part = tokens_only.select(torch.tensor([1]))
    assert part.response_ids.shape == (1, 4) and part.values is None


def test_minibatch_size_must_divide():
    with pytest.raises(ValueError, match="divide the batch size 4"):
        next(make_buffer().minibatches(3))
