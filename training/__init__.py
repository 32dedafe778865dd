"""Fine-tuning: data, trainer, checkpoints, export and the train launcher (training issue)."""
