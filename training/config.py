"""`TrainConfig`: one run's settings, named as in fms-hf-tuning / HF TrainingArguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model_lib.lora import LoraConfig

PEFT_METHODS = ("lora", "qlora", "none")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    model_name_or_path: str
    training_data_path: str
    output_dir: str
    validation_data_path: str | None = None
    validation_split: float = 0.0  # held-out fraction of the training data when no validation file is given

    # Data.
    dataset_text_field: str = "text"
    response_template: str | None = None
    data_formatter_template: str | None = None
    max_seq_length: int = 1024
    packing: bool = False

    # Adapters.
    peft_method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    # MoE expert parameters as PEFT's target_parameters (comma-separated on the command line):
    # `mlp.experts.gate_up_proj,mlp.experts.down_proj`; needs lora_dropout 0, as in PEFT.
    target_parameters: list[str] | None = None
    use_rslora: bool = False
    # QLoRA: also keep the token embedding and output head in NF4 (bitsandbytes keeps them in bf16).
    quantize_embeddings: bool = False

    # Optimisation.
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    torch_dtype: str = "bfloat16"  # compute dtype; full fine-tuning keeps float32 master weights
    gradient_checkpointing: bool = False
    # MoE models: add the router load-balancing loss (transformers' names); the
    # coefficient defaults to the checkpoint's `router_aux_loss_coef`.
    output_router_logits: bool = False
    router_aux_loss_coef: float | None = None
    mesh: str | None = None  # preset from configs/mesh (e.g. fsdp_tp)
    # Multi-host (jax.distributed): coordinator host:port (process 0), process count and this process's id.
    # Unset, they come from the environment jax.distributed reads (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI).
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    # Bookkeeping.
    logging_steps: int = 1
    save_steps: int = 0  # 0: save only at the end
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: evaluate only at the end (if there is validation data)
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    seed: int = 42
    merge_lora: bool = False  # also export base + adapter merged, as HF safetensors
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.peft_method not in PEFT_METHODS:
            raise ValueError(f"peft_method must be one of {PEFT_METHODS}, got {self.peft_method!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        if isinstance(self.target_modules, str) and "," in self.target_modules:
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if isinstance(self.target_parameters, str):
            self.target_parameters = [t.strip() for t in self.target_parameters.split(",") if t.strip()]
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps or num_train_epochs to a positive value")
        self.lora_config()  # the adapter settings are checked here, before a model loads

    def lora_config(self) -> LoraConfig | None:
        """The adapters' settings (None for full fine-tuning)."""
        if self.peft_method == "none":
            return None
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, use_rslora=self.use_rslora,
                          target_parameters=self.target_parameters)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        values = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
