"""jaxllm model library: configs, layers, families, registry, checkpoint I/O, sharding."""

from model_lib.checkpoint import CheckpointError, load_config, save_pretrained
from model_lib.config import ModelConfig, RopeConfig
from model_lib.decoder import CausalLM
from model_lib.loading import from_config, from_pretrained
from model_lib.registry import UnknownArchitectureError, supported_architectures
from model_lib.sharding import ShardingPlan, load_mesh_preset, make_mesh

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "RopeConfig",
    "ShardingPlan",
    "UnknownArchitectureError",
    "from_config",
    "from_pretrained",
    "load_config",
    "load_mesh_preset",
    "make_mesh",
    "save_pretrained",
    "supported_architectures",
]
