"""The pairwise reward model: the score head reads the last real token, the reward computed on the policy's
shared base equals the reward model loaded alone, files round-trip, and a tiny model learns pairs."""

import pytest
import torch
from tiny import randomise_adapters, tiny_model

from minippo import LoRAConfig, add_lora, quantize_model
from minippo.core import bradley_terry_loss
from minippo.lora import adapter_names, adapter_parameters, disable_adapters
from minippo.reward_model import RewardModel, last_token_index, read_reward_config

TEXTS = [
    "This movie was great, I loved the acting.",
    "Awful dialogue, a waste of time.",
    "A wonderful, moving picture",
    "Boring",
]
REWARD_LORA = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def base(tokenizer, bits=8):
    model = tiny_model("llama", len(tokenizer))
    model.name_or_path = "tiny-llama"
    return quantize_model(model, bits=bits) if bits else model


def trained_reward(tokenizer, bits=8):
    """A reward model with non-zero adapter and head, as after training."""
    model = add_lora(base(tokenizer, bits), REWARD_LORA, adapter_name="reward")
    reward = RewardModel(model, tokenizer)
    randomise_adapters(model, seed=5)
    with torch.no_grad():
        reward.score_head.summary.weight.normal_(generator=torch.Generator().manual_seed(2))
    return reward


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(right.flip(1)).tolist() == [3, 3, 3]


def test_score_is_padding_invariant(tokenizer):
    reward = trained_reward(tokenizer)
    batch = reward.tokenize(TEXTS)  # right-padded
    alone = torch.cat([reward.score([t]) for t in TEXTS])
    torch.testing.assert_close(reward.score(TEXTS), alone, rtol=1e-4, atol=1e-4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    left_ids = torch.stack([i.roll(int(len(i) - n)) for i, n in zip(ids, lengths)])
    left_mask = torch.stack([m.roll(int(len(m) - n)) for m, n in zip(mask, lengths)])
    with torch.no_grad():
        torch.testing.assert_close(reward(left_ids, left_mask), alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_reward_on_the_shared_base_equals_the_reward_model_alone(tokenizer, tmp_path, bits):
    trained = trained_reward(tokenizer, bits)
    trained.save(tmp_path / "rm", metadata={"base_model": "tiny-llama"})
    assert (tmp_path / "rm" / "reward" / "adapter_model.safetensors").exists()
    assert read_reward_config(tmp_path / "rm")["adapter_name"] == "reward"
    alone = RewardModel.load(tmp_path / "rm", base(tokenizer, bits), tokenizer)
    expected = alone.score(TEXTS)
    torch.testing.assert_close(expected, trained.score(TEXTS), rtol=0, atol=0)

    # the policy's model: its own adapter first, the reward adapter beside it on the same k-bit weights
    policy = randomise_adapters(add_lora(base(tokenizer, bits), LoRAConfig(r=4)), seed=9)
    ids = alone.tokenize(TEXTS)
    with torch.no_grad():
        policy_logits = policy(**ids).logits
    shared = RewardModel.load(tmp_path / "rm", policy, tokenizer)
    assert adapter_names(policy) == ["default", "reward"]
    torch.testing.assert_close(shared.score(TEXTS), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the policy is as before: the reward adapter is off outside `score`
        assert torch.equal(policy(**ids).logits, policy_logits)
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}  # the policy adapter's only
    assert trainable == {id(p) for p in adapter_parameters(policy, "default")}
    assert not any(p.requires_grad for p in shared.trainable_parameters())
    with disable_adapters(policy):  # the reference: the base alone
        with torch.no_grad():
            reference = policy(**ids).logits
    assert not torch.equal(reference, policy_logits)


def test_a_tiny_reward_model_learns_preference_pairs(tokenizer, one_thread):
    torch.manual_seed(0)
    model = add_lora(base(tokenizer, bits=8), REWARD_LORA, adapter_name="reward")
    reward = RewardModel(model, tokenizer, max_length=16)
    chosen = ["A wonderful, moving picture", "The best film of the year", "I loved the acting"]
    rejected = ["Awful dialogue, bad acting", "Boring and too long", "a waste of time and money"]
    opt = torch.optim.Adam(reward.trainable_parameters(), lr=3e-2)
    first = None
    for _ in range(30):
        scores = reward(**reward.tokenize(chosen + rejected))  # (2B,)
        loss, stats = bradley_terry_loss(scores[:3], scores[3:], center_rewards_coefficient=0.01)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first and stats["accuracy"].item() == 1.0
    scores = reward.score(chosen + rejected)
    assert scores[:3].min() > scores[3:].max()


def test_reward_folder_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a pairwise reward model"):
        read_reward_config(tmp_path)
    (tmp_path / "reward_model.json").write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="is not 'minippo-pairwise-reward'"):
        read_reward_config(tmp_path)
    with pytest.raises(ValueError, match=r"no adapter named 'reward'.*\['default'\]"):
        RewardModel(add_lora(base(tokenizer), LoRAConfig(r=2)), tokenizer)
