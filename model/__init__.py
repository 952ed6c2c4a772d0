"""The EfficientNet family (B0-B8, L2, Lite0-Lite4) in PyTorch.

Checkpoint-compatible with ``efficientnet_pytorch`` 0.7.1, exportable to ONNX, and free of any serving
concern: the service uses only what is exported here.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# The configurations are plain data and import no torch; everything else is imported on first use, so a
# process that only reads configurations and preprocesses images (the server's front-end workers) never
# loads torch.
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

_LAZY = {
    "EfficientNet": "efficientnet", "MBConvBlock": "efficientnet", "guess_variant": "efficientnet",
    "fold_batchnorm": "fuse",
    **{name: "layers" for name in ("Conv2dDynamicSamePadding", "Conv2dStaticSamePadding", "DropConnect",
                                   "MemoryEfficientSwish", "Swish", "calculate_output_image_size",
                                   "drop_connect", "get_activation", "get_same_padding_conv2d")},
    **{name: "imageops" for name in ("normalize", "pillow_resample", "resize_and_crop", "to_uint8_chw")},
    "Normalize": "preprocess", "preprocess_image": "preprocess",
    **{name: "weights" for name in ("WeightsError", "default_weights_path", "imagenet_classes",
                                    "read_state_dict")},
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # what the names above are, for type checkers and readers
    from .efficientnet import EfficientNet, MBConvBlock, guess_variant
    from .fuse import fold_batchnorm
    from .imageops import normalize, pillow_resample, resize_and_crop, to_uint8_chw
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
    from .preprocess import Normalize, preprocess_image
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
