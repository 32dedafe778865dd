"""Fine-tuning: data, trainer, checkpoints, export and the `train` launcher."""

from training.config import TrainConfig
from training.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
