"""S3Gen: speech tokens -> 24 kHz audio, and voice preparation from a reference clip."""

from .flow import Flow, FlowConfig
from .s3gen import PARTS, SPEECH_PARTS, VOICE_PARTS, S3Gen, S3GenConfig, infer_config, random_state_dict

__all__ = [
    "PARTS",
    "SPEECH_PARTS",
    "VOICE_PARTS",
    "Flow",
    "FlowConfig",
    "S3Gen",
    "S3GenConfig",
    "infer_config",
    "random_state_dict",
]
