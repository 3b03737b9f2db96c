"""Optional experiment trackers, trl's ``log_with``: TensorBoard, wandb or trackio (none is required).
The trainer logs each step's stats through one `Tracker` on rank 0; the metrics files stay the record."""

from __future__ import annotations

import importlib.util

TRACKERS = ("tensorboard", "wandb", "trackio")


def check_installed(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ImportError(
            f'log_with="{name}" needs the {name} package (not installed): pip install {name}'
        )


class Tracker:
    """``log(stats, step)`` and ``close()`` over one tracker. TensorBoard writes event files to
    ``logging_dir`` (torch.utils.tensorboard); wandb and trackio share their ``init/log/finish`` API."""

    def __init__(
        self, name: str, project: str, logging_dir: str | None = None, config: dict | None = None
    ):
        check_installed(name)
        self.name = name
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                logging_dir
            )  # None: runs/<date>_<host>, SummaryWriter's default
        else:
            self.module = importlib.import_module(name)
            self.module.init(project=project, config=config)

    def log(self, stats: dict[str, float], step: int) -> None:
        if self.name == "tensorboard":
            for key, value in stats.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        else:
            self.module.log(stats, step=step)

    def close(self) -> None:
        self.writer.close() if self.name == "tensorboard" else self.module.finish()
