"""Whole-subtomogram classifiers: one label per box, through pooling and a final layer.

Five networks from two of the project's papers, each as its paper describes it
(`papers/dilated-densenet-classifier.txt`, `papers/dsrf3d-rb3d-cb3d-classifiers.txt`):

- **3D-Dilated-DenseNet** and its baseline **3D-DenseNet** (Gao et al. 2020,
  section 2): a shallow 3x3x3 convolution; three dense blocks of L = 4 layers
  with growth rate k = 12 (section 3.2), every layer BN-ReLU-1x1x1 convolution
  (the "feature map compress module", 4k maps as in DenseNet-BC, ref. 10)
  then BN-ReLU-3x3x3 convolution over the concatenation of all earlier maps of
  its block; between blocks a transition (BN, 1x1x1 convolution halving the
  maps, 2x2x2 average pooling); global average pooling and one fully connected
  layer. In the dilated network the two middle layers of every block are
  dilated by 2 and 3 ("we choose 2 and 3 as dilated ration", "put the dilated
  convolution layer at the mid of block"): 1, 2, 3, 1, a zigzag with no common
  divisor above 1 (the hybrid-dilated-convolution rule). The baseline uses
  dilation 1 everywhere. Convolutions feeding a BN have no bias.
- **DSRF3D-v2** (Che et al. 2018, 2.1.1, Fig. 1): three sets of two 3x3x3
  convolutions (32, 64, 128 filters) and a 2x2x2 max pooling each; two fully
  connected layers of 1024 with 70 % dropout; a final layer of L classes.
- **RB3D** (2.1.2, Fig. 2): a 3x3x3 convolution (32) and 2x2x2 max pooling;
  four bottleneck residual blocks whose two paths, 1x1x1 (16) -> 3x3x3 (32) ->
  1x1x1 (16) and a 3x3x3 (16) shortcut, are merged by concatenation (32 maps);
  two fully connected layers of 1024 with 50 % dropout; L classes.
- **CB3D** (2.1.3, Fig. 3): eight 3x3x3 convolutions with ReLU (64, 128,
  256, 256, 512, 512, 512, 512) and five max poolings, the first 1x2x2 (no
  pooling along the first axis, z here); two fully connected layers of 4096
  with 50 % dropout; L classes.

The figures' channel numbers are not in the papers' text; the DSRF3D-v2, RB3D
and CB3D widths, RB3D's concatenating merge with 70 % dropout on the bottleneck
path, and CB3D's zero padding of (0, 1, 1) before its last pooling are those of
the authors' published Keras models (xulabs/projects, improved_classification).

All take boxes (N, 1, B, B, B) indexed [z, y, x] and return logits (N, L);
`predict` gives softmax probabilities. `width_divisor` divides every channel
and fully connected width (1 = the paper's network): the paper-sized DSRF3D-v2,
RB3D and CB3D have 4 to 260 million parameters, far beyond a CPU's training
budget. `layer_table()` lists each layer with its output shape and parameter
count (what the tests compare with the papers).
"""

from __future__ import annotations

import torch
from torch import nn

# Architecture names as `vpdetect train classifier --arch` takes them (msdnet is the segmenting MSDNet).
from vpdetect.nn.checkpoint import ARCHITECTURES, BOX_ARCH_KEYS, BOX_ARCHITECTURES  # noqa: F401


def _ch(n: int, divisor: int) -> int:
    return max(1, n // divisor)


class BoxClassifier(nn.Module):
    """Shared interface: arch() for the model card, predict(), layer_table()."""

    name = ""

    def __init__(self, in_channels: int, n_classes: int, box_size: int, width_divisor: int) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels), ("n_classes", n_classes),
            ("box_size", box_size), ("width_divisor", width_divisor),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"{self.name} {key} must be a positive integer, got {value!r}")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.box_size = int(box_size)
        self.width_divisor = int(width_divisor)

    def arch(self) -> dict:
        """The hyperparameters that rebuild this network (stored in model cards)."""
        return {"name": self.name, **{k: getattr(self, k) for k in BOX_ARCH_KEYS}}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (N, n_classes) in float32."""
        return torch.softmax(self(x).float(), dim=1)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` checked and channels-last (oneDNN's fast 3D convolutions on CPUs take 1.5-2x less time)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.name} expects boxes (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last_3d)

    def channels_last(self) -> BoxClassifier:
        """Store the convolution weights channels-last too (called once the network is built)."""
        return self.to(memory_format=torch.channels_last_3d)

    def _flat_size(self, features: nn.Module) -> int:
        """Values entering the first fully connected layer for this box size."""
        with torch.no_grad():
            probe = torch.zeros(1, self.in_channels, self.box_size, self.box_size, self.box_size)
            n = features.eval()(probe).numel()
        features.train()
        if n < 1:
            raise ValueError(f"{self.name}: box size {self.box_size} is too small for its poolings")
        return n

    def layer_table(self) -> list[tuple[str, str, tuple[int, ...], int]]:
        """(layer name, kind, output shape without batch, parameters) of every leaf layer, in order."""
        rows: list[tuple[str, str, tuple[int, ...], int]] = []
        hooks = []
        for name, module in self.named_modules():
            if list(module.children()) or isinstance(module, (nn.Identity, nn.Dropout)):
                continue

            def hook(mod, _inputs, output, name=name):
                params = sum(p.numel() for p in mod.parameters(recurse=False))
                rows.append((name, _kind(mod), tuple(output.shape[1:]), params))

            hooks.append(module.register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(torch.zeros(1, self.in_channels, self.box_size, self.box_size, self.box_size))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        return rows


_SIMPLE_KINDS = (
    (nn.AvgPool3d, "avgpool"), (nn.AdaptiveAvgPool3d, "gap"), (nn.BatchNorm3d, "bn"), (nn.Linear, "fc"),
    (nn.ReLU, "relu"), (nn.ConstantPad3d, "pad"), (nn.Flatten, "flatten"),
)


def _kind(module: nn.Module) -> str:
    """Short layer kind for layer tables: conv3x3x3 d2, maxpool1x2x2, fc, ..."""
    if isinstance(module, nn.Conv3d):
        k = "x".join(str(s) for s in module.kernel_size)
        dil = module.dilation[0]
        return f"conv{k}" + (f" d{dil}" if dil != 1 else "")
    if isinstance(module, nn.MaxPool3d):
        k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 3
        return "maxpool" + "x".join(str(s) for s in k)
    for kind, name in _SIMPLE_KINDS:
        if isinstance(module, kind):
            return name
    return type(module).__name__.lower()


# --------------------------------------------------------------------------- DenseNets


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1x1 (compress to `bottleneck` maps) then BN-ReLU-3x3x3 (dilated) to `growth` maps."""

    def __init__(self, n_in: int, growth: int, bottleneck: int, dilation: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm3d(n_in)
        self.relu1 = nn.ReLU()
        self.compress = nn.Conv3d(n_in, bottleneck, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(bottleneck)
        self.relu2 = nn.ReLU()
        self.conv = nn.Conv3d(bottleneck, growth, 3, padding=dilation, dilation=dilation, bias=False)

    def forward(self, x):
        return self.conv(self.relu2(self.bn2(self.compress(self.relu1(self.bn1(x))))))


class _DenseBlock(nn.Module):
    def __init__(self, n_in: int, growth: int, bottleneck: int, dilations) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(n_in + i * growth, growth, bottleneck, d) for i, d in enumerate(dilations)
        )
        self.n_out = n_in + len(self.layers) * growth

    def forward(self, x):
        maps = [x]
        for layer in self.layers:
            maps.append(layer(torch.cat(maps, dim=1)))
        return torch.cat(maps, dim=1)


class _Transition(nn.Sequential):
    """BN, 1x1x1 convolution to half the maps, 2x2x2 average pooling (paper section 2.1)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(nn.BatchNorm3d(n_in), nn.Conv3d(n_in, n_out, 1, bias=False), nn.AvgPool3d(2))


class DenseNet3D(BoxClassifier):
    """3D-DenseNet (all dilations 1) and 3D-Dilated-DenseNet (1, 2, 3, 1 in every block)."""

    name = "densenet"
    BLOCK_DILATIONS = (1, 1, 1, 1)
    GROWTH = 12  # paper section 3.2
    N_BLOCKS = 3  # "our network only contains three dilated dense blocks"
    COMPRESSION = 0.5

    def __init__(self, in_channels=1, n_classes=2, box_size=32, width_divisor=1) -> None:
        super().__init__(in_channels, n_classes, box_size, width_divisor)
        k = _ch(self.GROWTH, self.width_divisor)
        n = 2 * k
        self.stem = nn.Conv3d(self.in_channels, n, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for b in range(self.N_BLOCKS):
            block = _DenseBlock(n, k, 4 * k, self.BLOCK_DILATIONS)
            stages.append(block)
            n = block.n_out
            if b < self.N_BLOCKS - 1:
                n_next = int(n * self.COMPRESSION)
                stages.append(_Transition(n, n_next))
                n = n_next
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm3d(n), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.fc = nn.Linear(n, self.n_classes)
        self.n_features = n
        # Xavier-uniform weights, zero biases, BN gamma 1 / beta 0 (paper section 3.2).
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self._check_input(x)
        return self.fc(self.head(self.stages(self.stem(x))))


class DilatedDenseNet3D(DenseNet3D):
    name = "dilated-densenet"
    BLOCK_DILATIONS = (1, 2, 3, 1)


# --------------------------------------------------------------------------- Che et al. 2018


def _conv_relu(n_in: int, n_out: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv3d(n_in, n_out, kernel, padding=kernel // 2), nn.ReLU()]


def _fc_head(n_in: int, width: int, n_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(width, n_classes),
    )


class _FeaturesThenFC(BoxClassifier):
    """Convolutions and poolings (`features`, ending in a flatten), then fully connected layers."""

    def forward(self, x):
        x = self._check_input(x)
        return self.classifier(self.features(x))


class DSRF3Dv2(_FeaturesThenFC):
    """Deep small receptive field network v2: VGG-like, 3 x (2 convolutions + max pooling), FC 1024 x 2."""

    name = "dsrf3d-v2"
    WIDTHS = (32, 64, 128)
    FC = 1024
    DROPOUT = 0.7

    def __init__(self, in_channels=1, n_classes=2, box_size=40, width_divisor=1) -> None:
        super().__init__(in_channels, n_classes, box_size, width_divisor)
        layers: list[nn.Module] = []
        n = self.in_channels
        for w in self.WIDTHS:
            w = _ch(w, self.width_divisor)
            layers += _conv_relu(n, w) + _conv_relu(w, w) + [nn.MaxPool3d(2)]
            n = w
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = _fc_head(
            self._flat_size(self.features), _ch(self.FC, self.width_divisor), self.n_classes, self.DROPOUT
        )


class _ResidualBlock(nn.Module):
    """Bottleneck path 1x1x1 -> 3x3x3 -> 1x1x1 beside a 3x3x3 shortcut, merged by concatenation."""

    def __init__(self, n_in: int, narrow: int, wide: int, dropout: float) -> None:
        super().__init__()
        self.shortcut = nn.Sequential(*_conv_relu(n_in, narrow))
        self.bottleneck = nn.Sequential(
            *_conv_relu(n_in, narrow, 1), *_conv_relu(narrow, wide),
            nn.Conv3d(wide, narrow, 1), nn.Dropout(dropout),
        )
        self.relu = nn.ReLU()
        self.n_out = 2 * narrow

    def forward(self, x):
        return self.relu(torch.cat([self.shortcut(x), self.bottleneck(x)], dim=1))


class RB3D(_FeaturesThenFC):
    """Residual-block network: convolution + max pooling, 4 bottleneck residual blocks, FC 1024 x 2."""

    name = "rb3d"
    STEM = 32
    NARROW, WIDE = 16, 32
    N_BLOCKS = 4
    FC = 1024
    BLOCK_DROPOUT, FC_DROPOUT = 0.7, 0.5

    def __init__(self, in_channels=1, n_classes=2, box_size=40, width_divisor=1) -> None:
        super().__init__(in_channels, n_classes, box_size, width_divisor)
        d = self.width_divisor
        n = _ch(self.STEM, d)
        layers: list[nn.Module] = [*_conv_relu(self.in_channels, n), nn.MaxPool3d(2)]
        for _ in range(self.N_BLOCKS):
            block = _ResidualBlock(n, _ch(self.NARROW, d), _ch(self.WIDE, d), self.BLOCK_DROPOUT)
            layers.append(block)
            n = block.n_out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = _fc_head(self._flat_size(self.features), _ch(self.FC, d), self.n_classes, self.FC_DROPOUT)


class CB3D(_FeaturesThenFC):
    """C3D-based network: 8 convolutions, 5 max poolings (the first 1x2x2), FC 4096 x 2."""

    name = "cb3d"
    # (channels of each convolution in the group) per pooling group.
    GROUPS = ((64,), (128,), (256, 256), (512, 512), (512, 512))
    FC = 4096
    DROPOUT = 0.5

    def __init__(self, in_channels=1, n_classes=2, box_size=40, width_divisor=1) -> None:
        super().__init__(in_channels, n_classes, box_size, width_divisor)
        layers: list[nn.Module] = []
        n = self.in_channels
        for g, widths in enumerate(self.GROUPS):
            for w in widths:
                w = _ch(w, self.width_divisor)
                layers += _conv_relu(n, w)
                n = w
            if g == 0:
                layers.append(nn.MaxPool3d((1, 2, 2)))  # keeps the first axis early, as C3D does for time
            else:
                if g == len(self.GROUPS) - 1:
                    layers.append(nn.ConstantPad3d((1, 1, 1, 1, 0, 0), 0.0))  # (0, 1, 1) in z, y, x
                layers.append(nn.MaxPool3d(2))
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = _fc_head(
            self._flat_size(self.features), _ch(self.FC, self.width_divisor), self.n_classes, self.DROPOUT
        )


_CLASSES = {cls.name: cls for cls in (DilatedDenseNet3D, DenseNet3D, DSRF3Dv2, RB3D, CB3D)}


def build_box_classifier(name: str, in_channels: int = 1, n_classes: int = 2, box_size: int = 32,
                         width_divisor: int = 1) -> BoxClassifier:
    """The whole-box network `name` (one of BOX_ARCHITECTURES)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown box classifier {name!r}; choose one of {', '.join(BOX_ARCHITECTURES)}")
    return _CLASSES[name](in_channels, n_classes, box_size, width_divisor).channels_last()
