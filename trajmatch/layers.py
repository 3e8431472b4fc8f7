"""Convolution, instance norm, ReLU and 2x2 average pooling with a cheaper second derivative.

Trajectory matching differentiates the student's gradient: every inner step runs a layer's backward with
create_graph=True, and the matching loss's backward then runs that backward's backward. PyTorch's own
layers pay for this in four places, none of which changes a value:
- GroupNorm's create_graph backward is a composite of a dozen element-wise ops (so that it can be
  differentiated), and its derivative walks back through all of them;
- the derivatives of ReLU's and average pooling's backward with respect to their saved input are zero,
  but autograd materialises those zeros as full tensors and adds them into the adjoints;
- NCHW average pooling and its backward are slow kernels on a CPU;
- the convolution's double backward builds its input part from a transposed convolution.
Here each layer is a pair of autograd Functions: the forward's backward is a Function whose forward is the
fused ATen kernel (convolution_backward, native_group_norm_backward, threshold_backward; pooling by slices)
and whose backward is that kernel's derivative written out: for instance norm a handful of per-channel
reductions and fused multiply-adds (the formulas below), for the convolution one forward or backward kernel
per part, for ReLU and pooling the same linear map again and nothing for the saved input. Each part is
computed only when the running backward pass needs it (engine_needs). The second derivative is not
differentiable again: a third derivative raises ThirdDerivativeError.

The modules are nn.Conv2d / nn.GroupNorm / nn.ReLU / nn.AvgPool2d subclasses with the same parameters,
names and state dict; they take the fused path only where it is supported (autograd recording, no autocast,
no torch.func transform such as the stacked students' vmap, float32/float64 4-d input) and call the stock
functional otherwise. tests/test_layers.py checks values, gradients and second derivatives against the stock
layers and finite differences in float64, and the trajectory-matching gradient of a ConvNet built from them
against one built from the stock layers. Timings: docs/benchmarks.md; formulas: docs/method.md, section 2.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

aten = torch.ops.aten


class ThirdDerivativeError(RuntimeError):
    """A derivative of these layers' second derivative was asked for."""


def second_order_only(backward):
    """Mark a hand-written second derivative: it runs without recording, and differentiating through it
    (a third derivative) raises instead of silently dropping the terms through the saved tensors."""
    def wrapped(ctx, *grads):
        if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
            raise ThirdDerivativeError("trajmatch/layers.py gives second derivatives only; for a third one "
                                       "build the network with trajmatch.layers.stock_layers(net)")
        with torch.no_grad():
            return backward(ctx, *grads)
    return wrapped


def engine_needs(ctx, i: int) -> bool:
    """Whether the running backward pass needs the gradient of input i of the Function behind ctx (the
    stock C++ nodes skip outputs the engine will not use, e.g. the images' gradient inside an inner
    step's autograd.grad(loss, w)). Where the engine cannot tell (a leaf asked for by autograd.grad),
    yes."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (RuntimeError, AttributeError):
        return True


def fused_path(x: torch.Tensor) -> bool:
    """Whether the custom Functions apply: a recorded float 4-d call outside autocast and torch.func."""
    return (torch.is_grad_enabled() and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and not torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------- instance norm (GroupNorm, C groups)

def _sums_with_xhat(t: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Per (sample, channel): Σ t x̂ and Σ t over the pixels, x̂ = (x - mean) rstd, in one fused pass:
    native_group_norm_backward's γ and β gradients of the map seen as one sample of N·C channels."""
    n, c, h, w = x.shape
    _, s_tx, s_t = aten.native_group_norm_backward(t.reshape(1, n * c, h, w), x.reshape(1, n * c, h, w),
                                                   mean.reshape(1, n * c), rstd.reshape(1, n * c), None,
                                                   1, n * c, h * w, n * c, [False, True, True])
    return s_tx.view(n, c, 1, 1), s_t.view(n, c, 1, 1)


class _InstanceNorm(Function):
    """y = γ (x - μ) r + β per (sample, channel), r = (σ² + eps)^(-1/2): native_group_norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n, c = x.shape[:2]
        y, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, x.shape[2] * x.shape[3], c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = _InstanceNormBackward.apply(gy, x, weight, mean, rstd)
        return gx, gw, gb, None


class _InstanceNormBackward(Function):
    """(gx, gγ, gβ) of instance norm, from native_group_norm_backward; its own backward by hand.

    Per (sample, channel), with M = H W, x̂ = (x - μ) r, means over the M pixels:
      gx = γ r (gy - mean(gy) - x̂ b),  b = mean(gy x̂);  gγ = Σ gy x̂;  gβ = Σ gy  (sums also over samples).
    For adjoints (ggx, ggγ, ggβ) of those outputs, with m = mean(ggx), cc = mean(ggx x̂), a = mean(gy),
    s = mean(ggx (gy - a - x̂ b)) and G = (ggγ - γ r cc) gy - γ r b ggx:
      d gy = γ r (ggx - m - x̂ cc) + ggγ x̂ + ggβ
      d x  = r (G - mean(G) - x̂ mean(G x̂)) - γ r² s x̂          (x̂ and r both depend on x)
      d γ  = Σ_samples M r s
    """

    @staticmethod
    def forward(ctx, gy, x, weight, mean, rstd):
        n, c = x.shape[:2]
        out = aten.native_group_norm_backward(gy, x, mean, rstd, weight, n, c, x.shape[2] * x.shape[3], c,
                                              [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, rstd)
        return out

    @staticmethod
    @second_order_only
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        hw = h * w
        mu, r = mean.view(n, c, 1, 1), rstd.view(n, c, 1, 1)
        gr = weight.view(1, c, 1, 1) * r
        ggw, ggb = ggw.view(1, c, 1, 1), ggb.view(1, c, 1, 1)
        # the five per-(sample, channel) means, in three fused passes (no temporaries of the map's size)
        b, a = (t / hw for t in _sums_with_xhat(gy, x, mean, rstd))           # mean(gy x̂), mean(gy)
        cc, m = (t / hw for t in _sums_with_xhat(ggx, x, mean, rstd))         # mean(ggx x̂), mean(ggx)
        e = _sums_with_xhat(ggx, gy, torch.zeros_like(mean), torch.ones_like(rstd))[0] / hw  # mean(ggx gy)
        s = e - a * m - b * cc                                                # mean(ggx (gy - a - x̂ b))
        beta_gy, beta_ggx = ggw - gr * cc, -gr * b                            # G = beta_gy gy + beta_ggx ggx
        mean_g = beta_gy * a + beta_ggx * m
        k = r * (beta_gy * b + beta_ggx * cc + gr * s)                        # r (mean(G x̂) + γ r s)
        # x̂ = r x - r μ: each output is one broadcast multiply-add on x, then one per other map
        d_gy = d_x = d_w = None
        if engine_needs(ctx, 0):  # d gy = gr ggx + beta_gy x̂ + (ggb - gr m)
            d_gy = torch.addcmul(ggb - gr * m - beta_gy * r * mu, x, beta_gy * r).addcmul_(ggx, gr.expand_as(r))
        if engine_needs(ctx, 1):  # d x = r (G - mean_g) - k x̂
            d_x = torch.addcmul(k * r * mu - r * mean_g, x, -k * r)
            d_x.addcmul_(gy, r * beta_gy).addcmul_(ggx, r * beta_ggx)
        if engine_needs(ctx, 2):
            d_w = (s * r).sum(0).view(c) * hw
        return d_gy, d_x, d_w, None, None


class InstanceNorm(nn.GroupNorm):
    """nn.GroupNorm(C, C, affine=True): instance norm with per-channel affine parameters."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_path(x) and self.weight.dtype == x.dtype:
            return _InstanceNorm.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


# ---------------------------------------------------------------- ReLU

class _ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, = ctx.saved_tensors
        return _ReLUBackward.apply(gy, y)


class _ReLUBackward(Function):
    """gx = gy where y > 0: linear in gy; its derivative in y is zero (returned as None, never built)."""

    @staticmethod
    def forward(ctx, gy, y):
        ctx.save_for_backward(y)
        return aten.threshold_backward(gy, y, 0)

    @staticmethod
    @second_order_only
    def backward(ctx, ggx):
        y, = ctx.saved_tensors
        return (aten.threshold_backward(ggx, y, 0) if engine_needs(ctx, 0) else None), None


class ReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_path(x) and not self.inplace:
            return _ReLU.apply(x)
        return super().forward(x)


# ---------------------------------------------------------------- 2x2 average pooling, stride 2
#
# ATen's NCHW avg_pool2d and its backward walk the map window by window, about 1.7 ms for a
# 10x128x32x32 map on one core where a ReLU takes 0.09 ms. Two slice-adds (rows, then columns) give the
# same means up to the order of the four-term sum, 5-8x faster; the backward (a quarter of each gradient,
# repeated over its window) is bit-identical to avg_pool2d_backward, 3x faster. Odd sizes drop the last
# row / column, as avg_pool2d does.

def pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean, stride 2: (x00 + x10) + (x01 + x11), times 1/4."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :h, :w]
    rows = x[:, :, 0::2] + x[:, :, 1::2]
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def unpool2(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The adjoint of pool2: each of g's values, a quarter of it, on its 2x2 window of a `shape` map."""
    n, c, h, w = g.shape
    out = (g * 0.25).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 1, 2 * w)
    out = out.expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)
    if tuple(out.shape) != tuple(shape):  # odd input: the dropped row / column gets no gradient
        out = F.pad(out, (0, shape[3] - 2 * w, 0, shape[2] - 2 * h))
    return out


class _AvgPool2(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.in_shape = x.shape  # its backward reads the size only: nothing saved
        return pool2(x)

    @staticmethod
    def backward(ctx, gy):
        return _AvgPool2Backward.apply(gy, ctx.in_shape)


class _AvgPool2Backward(Function):
    """gx = unpool2(gy): linear in gy, its adjoint is the pooling itself."""

    @staticmethod
    def forward(ctx, gy, shape):
        return unpool2(gy, shape)

    @staticmethod
    @second_order_only
    def backward(ctx, ggx):
        return (pool2(ggx) if engine_needs(ctx, 0) else None), None


class AvgPool2(nn.AvgPool2d):
    """nn.AvgPool2d(kernel_size=2, stride=2)."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_path(x):
            return _AvgPool2.apply(x)
        return super().forward(x)


# ---------------------------------------------------------------- convolution
#
# PyTorch's convolution double backward (_convolution_double_backward) builds the input's part from a
# transposed convolution, which on a CPU runs about 1.4x slower than the backward-data kernel that computes
# the same map (docs/benchmarks.md). Here each part is one forward or backward kernel of the convolution.

class _Conv(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        stride, padding, dilation, groups = conf
        ctx.conf, ctx.has_bias = conf, bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        mask = (engine_needs(ctx, 0), engine_needs(ctx, 1), ctx.has_bias and engine_needs(ctx, 2))
        gx, gw, gb = _ConvBackward.apply(gy, x, weight, ctx.conf, mask)
        return gx, gw, gb, None


def _conv_backward(gy, x, weight, conf, mask):
    stride, padding, dilation, groups = conf
    return aten.convolution_backward(gy, x, weight, [weight.shape[0]] if mask[2] else None, stride, padding,
                                     dilation, False, [0, 0], groups, list(mask))


class _ConvBackward(Function):
    """(gx, gW, gb) = convolution_backward(gy), each only where asked. Its backward, for adjoints
    (ḡx, ḡW, ḡb): d gy = conv(x, ḡW) + ḡb + conv(ḡx, W), d x = backward-data of conv(., ḡW) at gy,
    d W = backward-weight of conv(ḡx, .) at gy (every part linear: one kernel each)."""

    @staticmethod
    def forward(ctx, gy, x, weight, conf, mask):
        ctx.set_materialize_grads(False)
        ctx.conf = conf
        ctx.save_for_backward(gy, x, weight)
        return _conv_backward(gy, x, weight, conf, mask)

    @staticmethod
    @second_order_only
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = conf = ctx.conf
        d_gy = d_x = d_w = None
        if engine_needs(ctx, 0):
            if ggw is not None:
                d_gy = F.conv2d(x, ggw, ggb, stride, padding, dilation, groups)
            elif ggb is not None:
                d_gy = ggb.view(1, -1, 1, 1).expand_as(gy)
            if ggx is not None:
                t = F.conv2d(ggx, weight, None, stride, padding, dilation, groups)
                d_gy = t if d_gy is None else t.add_(d_gy)
        if ggw is not None and engine_needs(ctx, 1):
            d_x = _conv_backward(gy, x, ggw, conf, (True, False, False))[0]
        if ggx is not None and engine_needs(ctx, 2):
            d_w = _conv_backward(gy, ggx, weight, conf, (False, True, False))[1]
        return d_gy, d_x, d_w, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (zero padding given as numbers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_path(x) and self.padding_mode == 'zeros' and not isinstance(self.padding, str) \
                and self.weight.dtype == x.dtype:
            return _Conv.apply(x, self.weight, self.bias, (self.stride, self.padding, self.dilation, self.groups))
        return super().forward(x)


# ---------------------------------------------------------------- the stock layers back

def stock_layers(net: nn.Module) -> nn.Module:
    """net with every layer above replaced, in place, by the stock PyTorch layer it stands for (sharing
    its parameters): the network as MTT's code builds it, for the benchmark's baseline and the tests.
    Swap before wrapping the network in a ReparamModule, which binds its parameter slots once."""
    for name, child in list(net.named_children()):
        if isinstance(child, InstanceNorm):
            stock = nn.GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=True)
            stock.weight, stock.bias = child.weight, child.bias
        elif isinstance(child, ReLU):
            stock = nn.ReLU(inplace=child.inplace)
        elif isinstance(child, AvgPool2):
            stock = nn.AvgPool2d(kernel_size=2, stride=2)
        elif isinstance(child, Conv2d):
            stock = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                              child.dilation, child.groups, child.bias is not None, child.padding_mode)
            stock.weight, stock.bias = child.weight, child.bias
        else:
            stock_layers(child)
            continue
        setattr(net, name, stock)
    return net
