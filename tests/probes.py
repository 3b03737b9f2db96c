"""What tests watch a trainer with, through its public surface: a `PPOCallback` that records, and a
count of the backbone's forwards."""

from minippo.ppo import PPOCallback


class Recorder(PPOCallback):
    """Records the rollout buffer of every step and the stats of every minibatch."""

    def __init__(self):
        self.buffers = []
        self.minibatches = []

    def on_minibatch(self, trainer, minibatch, stats):
        self.minibatches.append(stats)

    def on_step_end(self, trainer, batch, stats):
        self.buffers.append(batch)


def capture(trainer) -> Recorder:
    """Record the rollout buffer and the stats of every minibatch of the trainer's next steps."""
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    return recorder


class ForwardCounter:
    """Counts the backbone's forwards inside a `with` block (a forward hook, removed on exit)."""

    def __init__(self, trainer):
        self.calls = 0
        self.backbone = trainer.policy.backbone

    def __enter__(self):
        self.handle = self.backbone.register_forward_hook(self.count)
        return self

    def count(self, *args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()
