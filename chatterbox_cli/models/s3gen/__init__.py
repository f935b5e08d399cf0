"""S3Gen: speech tokens -> 24 kHz audio, and voice preparation from a reference clip."""

from .flow import Flow, FlowConfig
from .s3gen import (
    FLOW_TOKEN_BLOCK,
    MEANFLOW_KEY,
    PARTS,
    SPEECH_PARTS,
    VOICE_PARTS,
    MeanflowS3GenConfig,
    S3Gen,
    S3GenConfig,
    flow_batch_rows,
    infer_config,
    is_meanflow_file,
    random_state_dict,
)

__all__ = [
    "FLOW_TOKEN_BLOCK",
    "MEANFLOW_KEY",
    "PARTS",
    "SPEECH_PARTS",
    "VOICE_PARTS",
    "Flow",
    "FlowConfig",
    "MeanflowS3GenConfig",
    "S3Gen",
    "S3GenConfig",
    "flow_batch_rows",
    "infer_config",
    "is_meanflow_file",
    "random_state_dict",
]
