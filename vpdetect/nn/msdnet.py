"""The 3D mixed-scale dense network (MSDNet) of VP-Detector (paper section 2.3).

Layer i (0-based) computes `width` new channels, each a 3x3x3 dilated
convolution over *all* earlier maps (the input's C channels and the w*i
channels of layers 0..i-1), plus a bias, through LeakyReLU(0.01). Channel j of
layer i uses dilation ((i*w + j) mod M) + 1, so the dilations cycle through
1..M (hybrid dilated convolution, no holes in the receptive field). A final
1x1x1 convolution over all C + w*d maps gives the class logits.

Weight layout (read by anything that evaluates these weights itself):

- `layer_weights[i]`: tensor (w, C + i*w, 3, 3, 3); row j is channel j's filter
  over maps 0..C+i*w-1 in buffer order (input channels first, then layer 0's
  w channels, layer 1's, ...).
- `layer_biases[i]`: tensor (w,).
- `dilation_of(i, j)` = ((i*w + j) mod M) + 1; zero padding of that size.
- `final.weight` (n_classes, C + w*d, 1, 1, 1), `final.bias` (n_classes,).

All maps live in one preallocated buffer (N, C + w*d, D, H, W): layer i reads
buffer[:, :C+i*w] and writes its w channels in place, so nothing is
concatenated per layer. A layer is evaluated either as one dilated conv3d per
output channel ("conv", used on GPUs: cuDNN) or as one matrix multiply giving
all 27 taps of all w channels followed by shifted adds ("gemm", used on CPUs,
where oneDNN is slow for single-output dilated convolutions); both give the
same result. Training uses `_DenseStack`, an autograd function that keeps
only the buffer: its backward walks the layers in reverse, computing the
input and weight gradients of each layer (conv: `torch.nn.grad.conv3d_*`;
gemm: two matrix multiplies with the tap-shifted output gradient) and takes
LeakyReLU's derivative from the sign of the stored outputs (a LeakyReLU
output is positive exactly when its input is). Memory: the buffer plus one
float32 gradient buffer of the same size (float32 under autocast too: it sums
contributions of every later layer), instead of a concatenated copy per layer.
The "conv" path runs sample by sample so that each convolution reads a
contiguous view of the buffer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEGATIVE_SLOPE = 0.01


def dilation_of(layer: int, channel: int, width: int, max_dilation: int) -> int:
    """Dilation of `channel` in `layer` (both 0-based): ((i*w + j) mod M) + 1."""
    return (layer * width + channel) % max_dilation + 1


def _layer_dilations(depth: int, width: int, max_dilation: int) -> list[list[int]]:
    return [[dilation_of(i, j, width, max_dilation) for j in range(width)] for i in range(depth)]


def _taps(dilation: int, shape: tuple[int, int, int]):
    """For each of the 27 taps (kz, ky, kx order): (output slices, source slices).

    A dilated 3x3x3 cross-correlation with zero padding reads src(v + (k-1)*d);
    restricted to in-bounds voxels that is out[dst] += tap_k(src)[src_slices].
    """
    per_axis = []
    for n in shape:
        axis = []
        for k in range(3):
            o = (k - 1) * dilation
            # Clamped length: an axis shorter than the dilation has no in-bounds pairs
            # (a negative slice stop would silently count from the end).
            length = max(0, n - abs(o))
            dst_start, src_start = max(0, -o), max(0, o)
            axis.append(
                (slice(dst_start, dst_start + length), slice(src_start, src_start + length))
            )
        per_axis.append(axis)
    taps = []
    for az in per_axis[0]:
        for ay in per_axis[1]:
            for ax in per_axis[2]:
                taps.append(((az[0], ay[0], ax[0]), (az[1], ay[1], ax[1])))
    return taps


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(w, C, 3, 3, 3) -> (w*27, C): row j*27 + tap holds channel j's tap over all inputs."""
    w, c = weight.shape[:2]
    return weight.reshape(w, c, 27).permute(0, 2, 1).reshape(w * 27, c)


def _layer_gemm(source: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilations, out: torch.Tensor):
    """One dense layer as a matrix multiply per sample plus 27 shifted adds per channel.

    source (N, C, D, H, W) and out (N, w, D, H, W) are views of the feature
    buffer; out is written in place (pre-activation + bias). T = W (27w, C) @
    source (C, V) gives every tap of every channel; channel j sums its 27 taps
    shifted by its own dilation. oneDNN runs single-output dilated
    convolutions slowly on CPUs; this form is several times faster there.
    """
    n, c = source.shape[:2]
    shape = tuple(source.shape[2:])
    matrix = _weight_matrix(weight)
    taps = [_taps(dil, shape) for dil in dilations]
    # Sample by sample: one sample's taps (27w x voxels) stay in the cache while they are
    # added up; a whole batch's would not (4 crops of 40^3: 55 MB).
    for s in range(n):
        taps_out = torch.mm(matrix, source[s].reshape(c, -1)).reshape(-1, 27, *shape)
        for j, channel_taps in enumerate(taps):
            acc = out[s, j]
            acc.copy_(bias[j].expand_as(acc))
            for k, (dst, src) in enumerate(channel_taps):
                acc[dst] += taps_out[(j, k, *src)]


def _layer_gemm_backward(source, weight, dilations, grad_pre, grad_source):
    """Gradients of `_layer_gemm`: adds into grad_source (N, C, ...), returns the weight gradient.

    With G (27w, V) the output gradient shifted back per tap (G[j, k](u) =
    grad_pre_j(u - offset_k)), dL/dW = G @ source^T and dL/dsource = W^T @ G:
    two matrix multiplies that read the source once each.
    """
    n, c = source.shape[:2]
    shape = tuple(source.shape[2:])
    w = len(dilations)
    taps = [_taps(dil, shape) for dil in dilations]
    # grad_source may be float32 while the operands are in the autocast dtype.
    matrix_t = _weight_matrix(weight).t().to(grad_source.dtype)
    grad_matrix = torch.zeros((w * 27, c), dtype=gradient_dtype(source.dtype), device=source.device)
    # Sample by sample, as the forward: one sample's shifted gradients stay in the cache.
    shifted = grad_pre.new_empty((w, 27, *shape))
    for s in range(n):
        shifted.zero_()
        for j, channel_taps in enumerate(taps):
            for k, (dst, src) in enumerate(channel_taps):
                shifted[(j, k, *src)] = grad_pre[(s, j, *dst)]
        flat = shifted.reshape(w * 27, -1)
        grad_source[s].view(c, -1).addmm_(matrix_t, flat.to(grad_source.dtype))
        grad_matrix += torch.mm(flat, source[s].reshape(c, -1).t())  # (27w, C)
    return grad_matrix.reshape(w, 27, c).permute(0, 2, 1).reshape(weight.shape)


def _use_gemm(device: torch.device, method: str) -> bool:
    if method not in ("auto", "gemm", "conv"):
        raise ValueError(f"unknown MSDNet method {method!r} (auto, gemm or conv)")
    return method == "gemm" or (method == "auto" and device.type == "cpu")


def _fill_buffer(
    buffer: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    dilations: list[list[int]],
    in_channels: int,
    method: str = "auto",
) -> None:
    """Run the dense layers, writing each layer's channels into `buffer` in place.

    `method`: "conv" (one dilated conv3d per output channel; cuDNN on GPUs),
    "gemm" (matrix multiply + shifted adds; faster on CPUs), "auto" = by device.
    """
    width = len(dilations[0]) if dilations else 0
    gemm = _use_gemm(buffer.device, method)
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        n_in = in_channels + i * width
        source = buffer[:, :n_in]
        weight = weight.to(buffer.dtype)
        bias = bias.to(buffer.dtype)
        out = buffer[:, n_in : n_in + width]
        if gemm:
            _layer_gemm(source, weight, bias, dilations[i], out)
        else:
            # Sample by sample: buffer[n:n+1, :n_in] is contiguous, buffer[:, :n_in] is not
            # when N > 1 (cuDNN would copy it once per output channel).
            for n in range(buffer.shape[0]):
                for j, dil in enumerate(dilations[i]):
                    out[n : n + 1, j : j + 1] = F.conv3d(
                        source[n : n + 1], weight[j : j + 1], bias[j : j + 1], padding=dil, dilation=dil
                    )
        F.leaky_relu(out, NEGATIVE_SLOPE, inplace=True)


def gradient_dtype(buffer_dtype: torch.dtype) -> torch.dtype:
    """The dtype the backward pass accumulates the feature gradients in: at least float32."""
    return torch.promote_types(buffer_dtype, torch.float32)


class _DenseStack(torch.autograd.Function):
    """Input -> filled feature buffer, with a backward that needs only the buffer."""

    @staticmethod
    def forward(ctx, x, dilations, n_layers, method, *params):
        weights = list(params[:n_layers])
        biases = list(params[n_layers:])
        width = len(dilations[0]) if dilations else 0
        n, c = x.shape[:2]
        buffer = x.new_empty((n, c + width * n_layers, *x.shape[2:]))
        buffer[:, :c] = x
        # Autocast is off here: dtypes are chosen explicitly (the buffer's dtype).
        with torch.autocast(device_type=x.device.type, enabled=False):
            _fill_buffer(buffer, weights, biases, dilations, c, method)
        ctx.dilations = dilations
        ctx.n_layers = n_layers
        ctx.in_channels = c
        ctx.method = method
        ctx.save_for_backward(buffer, *params)
        return buffer

    @staticmethod
    def backward(ctx, grad_buffer):
        buffer, *params = ctx.saved_tensors
        n_layers = ctx.n_layers
        weights = params[:n_layers]
        biases = params[n_layers:]
        dilations = ctx.dilations
        c = ctx.in_channels
        width = len(dilations[0]) if dilations else 0
        gemm = _use_gemm(buffer.device, ctx.method)
        # Gradients from later layers accumulate into earlier channels in place, in float32
        # even under autocast: a bf16 sum over ~100 layers would lose the small terms.
        grad = grad_buffer.to(gradient_dtype(buffer.dtype), copy=True)
        grad_weights: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        grad_biases: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        with torch.autocast(device_type=buffer.device.type, enabled=False):
            for i in reversed(range(n_layers)):
                n_in = c + i * width
                source = buffer[:, :n_in]
                out = buffer[:, n_in : n_in + width]
                # LeakyReLU'(pre) from its output: 1 where positive, else the slope.
                slope = (out > 0).to(buffer.dtype) * (1.0 - NEGATIVE_SLOPE) + NEGATIVE_SLOPE
                grad_pre32 = grad[:, n_in : n_in + width] * slope
                grad_pre = grad_pre32.to(buffer.dtype)  # the convolutions run in the buffer's dtype
                weight = weights[i].to(buffer.dtype)
                gw = torch.zeros_like(weights[i])
                if gemm:
                    gw += _layer_gemm_backward(source, weight, dilations[i], grad_pre, grad[:, :n_in]).to(gw.dtype)
                else:
                    # Per sample and channel, so that every operand is a contiguous view.
                    for n in range(buffer.shape[0]):
                        sample = source[n : n + 1]
                        for j, dil in enumerate(dilations[i]):
                            g = grad_pre[n : n + 1, j : j + 1].contiguous()
                            grad[n : n + 1, :n_in] += torch.nn.grad.conv3d_input(
                                sample.shape, weight[j : j + 1], g, padding=dil, dilation=dil
                            )
                            gw[j : j + 1] += torch.nn.grad.conv3d_weight(
                                sample, weight[j : j + 1].shape, g, padding=dil, dilation=dil
                            ).to(gw.dtype)
                grad_weights[i] = gw
                grad_biases[i] = grad_pre32.sum(dim=(0, 2, 3, 4)).to(biases[i].dtype)
        grad_input = grad[:, :c].to(buffer.dtype)
        return (grad_input, None, None, None, *grad_weights, *grad_biases)


class MSDNet(nn.Module):
    """3D mixed-scale dense network: `width` channels per layer, `depth` layers, dilations 1..M."""

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        width: int = 2,
        depth: int = 49,
        max_dilation: int = 7,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("n_classes", n_classes),
            ("width", width),
            ("depth", depth),
            ("max_dilation", max_dilation),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"MSDNet {name} must be a positive integer, got {value!r}")
        self.in_channels = int(in_channels)
        self.n_classes = int(n_classes)
        self.width = int(width)
        self.depth = int(depth)
        self.max_dilation = int(max_dilation)
        self.dilations = _layer_dilations(self.depth, self.width, self.max_dilation)
        self.layer_weights = nn.ParameterList()
        self.layer_biases = nn.ParameterList()
        for i in range(self.depth):
            n_in = self.in_channels + i * self.width
            # He initialisation for LeakyReLU, fan-in = 27 taps x all earlier maps.
            std = math.sqrt(2.0 / (27 * n_in))
            self.layer_weights.append(nn.Parameter(torch.randn(self.width, n_in, 3, 3, 3) * std))
            self.layer_biases.append(nn.Parameter(torch.zeros(self.width)))
        self.final = nn.Conv3d(self.n_feature_maps, self.n_classes, kernel_size=1)
        # How the dense layers are evaluated: "auto" (gemm on CPU, conv elsewhere), "gemm", "conv".
        # Not a hyperparameter: every method gives the same result from the same weights.
        self.method = "auto"

    @property
    def n_feature_maps(self) -> int:
        """Channels in the feature buffer: input plus every layer's output."""
        return self.in_channels + self.width * self.depth

    @property
    def halo(self) -> int:
        """Voxels on each side of an output voxel that can influence it.

        The longest path through the network takes, in every layer, the channel
        with the largest dilation; each 3x3x3 layer reaches `dilation` voxels.
        """
        return sum(max(d) for d in self.dilations)

    def arch(self) -> dict:
        """The hyperparameters that rebuild this network (stored in model cards)."""
        return {
            "in_channels": self.in_channels,
            "n_classes": self.n_classes,
            "width": self.width,
            "depth": self.depth,
            "max_dilation": self.max_dilation,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The filled buffer (N, C + w*d, D, H, W): input channels then every layer's maps."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MSDNet expects input (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        params = list(self.layer_weights) + list(self.layer_biases)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
        )
        if needs_grad:
            return _DenseStack.apply(x, self.dilations, self.depth, self.method, *params)
        buffer = x.new_empty((x.shape[0], self.n_feature_maps, *x.shape[2:]))
        buffer[:, : self.in_channels] = x
        with torch.autocast(device_type=x.device.type, enabled=False):
            _fill_buffer(
                buffer,
                list(self.layer_weights),
                list(self.layer_biases),
                self.dilations,
                self.in_channels,
                self.method,
            )
        return buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, n_classes, D, H, W), the same spatial size as `x`."""
        buffer = self.features(x)
        return F.conv3d(buffer, self.final.weight.to(buffer.dtype), self.final.bias.to(buffer.dtype))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (N, n_classes, D, H, W) in float32."""
        return torch.softmax(self.forward(x).float(), dim=1)


def paper_parameter_count(
    in_channels: int, n_classes: int, width: int, depth: int
) -> int:
    """Trainable parameters by the paper's formula (filters + final 1x1x1 + biases)."""
    filters = 27 * sum(width * (i * width + in_channels) for i in range(depth))
    final = (width * depth + in_channels) * n_classes
    biases = width * depth + n_classes
    return filters + final + biases


def grow_depth(target: MSDNet, source: MSDNet) -> None:
    """Load `source`'s weights into the deeper `target` so that it computes the same map.

    An MSDNet's layer i reads the input and layers 0..i-1 only, and the dilations cycle by
    (layer, channel), so a shallower net's layers are exactly the first layers of a deeper
    one with the same width and dilation cycle. The extra layers keep their initialisation
    and the final 1x1x1 layer ignores them (zero weights) until training moves it: the
    deeper net starts where the shallower one ended (`vpdetect train --init`).
    """
    same = ("in_channels", "n_classes", "width", "max_dilation")
    if any(getattr(target, k) != getattr(source, k) for k in same) or source.depth > target.depth:
        raise ValueError(
            f"cannot grow an MSDNet {source.arch()} into {target.arch()}: only the depth may increase"
        )
    with torch.no_grad():
        for i in range(source.depth):
            target.layer_weights[i].copy_(source.layer_weights[i])
            target.layer_biases[i].copy_(source.layer_biases[i])
        n = source.n_feature_maps
        target.final.weight.zero_()
        target.final.weight[:, :n].copy_(source.final.weight)
        target.final.bias.copy_(source.final.bias)
