"""OG-CLIP models: registry, architecture, Matryoshka head, checkpoints."""

from ogclip.models.checkpoint import CheckpointError, LoadReport, load_checkpoint, read_state_dict, save_checkpoint
from ogclip.models.detail import DetailCLIP
from ogclip.models.mps import MPSCLIP
from ogclip.models.mrl import MatryoshkaHead, granularity_dims, truncate
from ogclip.models.ogclip import OGCLIP, ROIConvStem, ROIPatchEmbed
from ogclip.models.registry import (
    add_model_config,
    build_model,
    create_model,
    get_model_config,
    list_models,
    register_architecture,
)

__all__ = [
    "MPSCLIP",
    "OGCLIP",
    "CheckpointError",
    "DetailCLIP",
    "LoadReport",
    "MatryoshkaHead",
    "ROIConvStem",
    "ROIPatchEmbed",
    "add_model_config",
    "build_model",
    "create_model",
    "get_model_config",
    "granularity_dims",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
    "register_architecture",
    "save_checkpoint",
    "truncate",
]
