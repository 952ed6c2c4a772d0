"""The EfficientNet family (B0-B8, L2, Lite0-Lite4) in PyTorch.

Checkpoint-compatible with ``efficientnet_pytorch`` 0.7.1, exportable to ONNX, and free of any serving
concern: the service uses only what is exported here.
"""

from .config import (
    VARIANTS,
    BlockConfig,
    GlobalConfig,
    PreprocessConfig,
    VariantConfig,
    get_efficientnet_config,
    round_filters,
    round_repeats,
)
from .efficientnet import EfficientNet, MBConvBlock, guess_variant
from .fuse import fold_batchnorm
from .layers import (
    Conv2dDynamicSamePadding,
    Conv2dStaticSamePadding,
    DropConnect,
    MemoryEfficientSwish,
    Swish,
    calculate_output_image_size,
    drop_connect,
    get_activation,
    get_same_padding_conv2d,
)
from .preprocess import Normalize, normalize, pillow_resample, preprocess_image, resize_and_crop, to_uint8_chw
from .weights import WeightsError, default_weights_path, imagenet_classes, read_state_dict

__all__ = [
    "VARIANTS",
    "BlockConfig",
    "Conv2dDynamicSamePadding",
    "Conv2dStaticSamePadding",
    "DropConnect",
    "EfficientNet",
    "GlobalConfig",
    "MBConvBlock",
    "MemoryEfficientSwish",
    "Normalize",
    "PreprocessConfig",
    "Swish",
    "VariantConfig",
    "WeightsError",
    "calculate_output_image_size",
    "default_weights_path",
    "drop_connect",
    "fold_batchnorm",
    "get_activation",
    "get_efficientnet_config",
    "get_same_padding_conv2d",
    "guess_variant",
    "imagenet_classes",
    "normalize",
    "pillow_resample",
    "preprocess_image",
    "read_state_dict",
    "resize_and_crop",
    "round_filters",
    "round_repeats",
    "to_uint8_chw",
]
