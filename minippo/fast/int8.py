"""bitsandbytes' CPU LLM.int8() forward, op for op, with each input quantised once for all the layers that
read it, and an input gradient through the int8 GEMM.

`FastLinear8bitLt` is a `bnb.nn.Linear8bitLt` holding the same int8 weight (CB), row scales (SCB) and bias,
so every k-bit tool sees an 8-bit layer. Its forward computes, on a CPU, what bitsandbytes' own eval-mode
forward computes, bit for bit (tests/fast/test_int8.py):
1. A = x rounded to fp16; entries with |A| >= threshold are outliers and their columns are set aside;
2. each row of A without the outliers -> int8 (its absmax -> 127): CA and the row scales SCA;
3. out = (CA @ CB.T as int32) * SCA * SCB / 127^2, plus the bias, in x's dtype;
4. plus x[:, outlier columns] @ (CB * SCB / 127)[:, outlier columns].T in x's dtype.
Ref: Dettmers et al. 2022, "LLM.int8()", arXiv:2208.07339, sec. 3.
It computes that function in train mode too (bitsandbytes' CPU train mode multiplies by the dequantised
weight instead), so a model's 8-bit layers compute one function whatever its mode.

Steps 1-2 depend only on x and the threshold. q, k and v (or gate and up) read the same x, so within one
forward of the model an `Int8InputReuse` keeps the last quantisation per thread with a copy of its input,
found again by comparing x with that copy: a changed input (a write through `.data` included) never
matches, and another thread has its own.

The input gradient is grad @ (CB * SCB / 127) (bitsandbytes' own backward, ``int8_backward=False``), or,
where the hardware has an int8 GEMM, the same product with each row of grad * SCB / 127 rounded to int8
(absmax -> 127) and multiplied by CB as integers, as SwitchBack does (Wortsman et al. 2023,
arXiv:2304.13013): the gradient within int8 rounding of the exact one (docs/fast.md)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import Tensor, nn

from ..quant import int8_weight_and_scales

# bitsandbytes' constant for 1 / 127^2 (int8_mm_dequant), kept as written so the products round alike
_INV_127_SQUARED = 6.200124e-05


@dataclass(frozen=True)
class QuantisedRows:
    """An input's rows (N, in) as LLM.int8() quantises them."""

    x: Tensor
    """(N, in) a copy of the input that was quantised: an input equal to it has this quantisation."""
    threshold: float
    """the outlier threshold it was quantised with."""
    ca: Tensor
    """(N, in) int8 rows, outlier columns zero."""
    sca: Tensor
    """(N,) fp32 absmax of each row without its outliers."""
    cols: Tensor | None
    """(k,) the outlier columns (None without a threshold)."""


def quantise_rows(x2d: Tensor, threshold: float, keep_input: bool = False) -> QuantisedRows:
    """Steps 1-2 of the module docstring for x (N, in): bitsandbytes' `int8_vectorwise_quant`, bit for bit.

    bitsandbytes zeroes each outlier entry, takes each row's absmax, quantises, then zeroes the outlier
    columns. The same numbers, with fewer passes over x: outlier columns from the column maxima, the
    rest of each row's absmax from x without those columns, and the columns' entries under the
    threshold (which count in their rows' absmax) from the k outlier columns alone. The fp16-rounded
    input is held in fp32, where it is exact and its scaling happens anyway (fp16 times fp32 scales),
    so no fp16 arithmetic runs, which a CPU does slowly. ``keep_input``: keep a copy of x to recognise
    it by (`Int8InputReuse`)."""
    a = x2d.to(torch.float16).float()  # (N, in): x rounded to fp16
    cols = None
    rest = a
    if threshold > 0.0:
        cols = (_absmax(a, 0) >= threshold).nonzero().view(-1)  # (k,) columns with an outlier
        if len(cols):
            rest = a.index_fill(1, cols, 0)  # (N, in) without them
    sca = _absmax(rest, 1)  # (N,)
    if cols is not None and len(cols):
        under = a[:, cols].abs()  # (N, k)
        sca = torch.maximum(sca, under.masked_fill_(under >= threshold, 0).amax(1))
    ca = (rest * (127.0 / sca.unsqueeze(-1))).round_().to(torch.int8)  # (N, in)
    kept = x2d.clone() if keep_input else x2d
    return QuantisedRows(kept, threshold, ca, sca, cols)


def _absmax(t: Tensor, dim: int) -> Tensor:
    """max |t| along ``dim``: two reductions, no |t| copy."""
    return torch.maximum(t.amax(dim), -t.amin(dim))


class Int8InputReuse:
    """The last `QuantisedRows` of each thread, kept from the start to the end of one forward of the module
    it is attached to (forward pre- and post-hooks, whose handles it keeps in ``handles``); outside such a
    forward every call quantises afresh. A lookup compares the input with the kept copy of the last one."""

    def __init__(self):
        self._threads = threading.local()
        self.handles: list = []

    def attach(self, module: nn.Module) -> None:
        self.handles.append(module.register_forward_pre_hook(self._open))
        self.handles.append(module.register_forward_hook(self._close))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _open(self, module, args) -> None:
        self._threads.scope = [None]  # this thread's last quantisation, in a forward of `module`

    def _close(self, module, args, output) -> None:
        self._threads.scope = None

    def quantised(self, x2d: Tensor, threshold: float) -> QuantisedRows:
        scope = getattr(self._threads, "scope", None)
        if scope is None:
            return quantise_rows(x2d, threshold)
        last = scope[0]
        same = last is not None and last.threshold == threshold and last.x.shape == x2d.shape
        same = same and last.x.dtype == x2d.dtype and last.x.device == x2d.device
        if same and torch.equal(last.x, x2d):  # a copy: a write since (through .data too) differs
            return last
        scope[0] = quantise_rows(x2d, threshold, keep_input=True)
        return scope[0]

    def __getstate__(self):  # a copied model gets its own, empty, unattached reuse
        return {}

    def __setstate__(self, state):
        self.__init__()


def int8_forward(x: Tensor, layer: FastLinear8bitLt) -> Tensor:
    """bitsandbytes' eval-mode `Linear8bitLt` forward of x (..., in) -> (..., out), steps 1-4."""
    CB, SCB = int8_weight_and_scales(layer)
    threshold = layer.state.threshold
    x2d = x.reshape(-1, x.shape[-1])  # (N, in)
    q = layer.reuse.quantised(x2d, threshold) if layer.reuse else quantise_rows(x2d, threshold)
    out_i32 = torch.ops.bitsandbytes.int8_linear_matmul(q.ca, CB)  # (N, out)
    out = q.sca.unsqueeze(-1) * SCB.unsqueeze(0)  # (N, out)
    out = out.mul_(out_i32).mul_(_INV_127_SQUARED)
    if layer.bias is not None:
        out = out.add_(layer.bias.to(x.dtype))
    out = out.to(x.dtype)
    if q.cols is not None and len(q.cols):
        weight_cols = bnb.functional.int8_vectorwise_dequant(CB[:, q.cols].contiguous(), SCB)
        out = out.addmm(x2d[:, q.cols].contiguous(), weight_cols.to(x.dtype).t())  # (N, out)
    return out.view(*x.shape[:-1], -1)


def int8_input_grad(grad: Tensor, layer: FastLinear8bitLt) -> Tensor:
    """d loss / d x for grad (..., out) -> (..., in): grad @ (CB * SCB / 127), exactly as bitsandbytes, or
    with the scaled rows of grad rounded to int8 (``layer.int8_backward``)."""
    CB, SCB = int8_weight_and_scales(layer)
    g = grad.reshape(-1, grad.shape[-1])  # (N, out)
    if not layer.int8_backward:
        weight = CB.to(grad.dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)
        return torch.matmul(g, weight).view(*grad.shape[:-1], -1)
    g = g.float() * (SCB / 127)  # (N, out)
    scale = torch.maximum(g.amax(1, keepdim=True), -g.amin(1, keepdim=True)).clamp_(min=1e-30)
    g8 = g.mul_(127 / scale).round_().to(torch.int8)  # (N, out)
    g = torch._int_mm(g8, CB).float().mul_(scale / 127)  # (N, in)
    return g.view(*grad.shape[:-1], -1).to(grad.dtype)


class _Int8Linear(torch.autograd.Function):
    """`int8_forward`, with `int8_input_grad` as its input gradient (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return int8_forward(x, layer)

    @staticmethod
    def backward(ctx, grad):
        return int8_input_grad(grad, ctx.layer), None


class FastLinear8bitLt(bnb.nn.Linear8bitLt):
    """A frozen `Linear8bitLt` computing bitsandbytes' eval-mode LLM.int8() on a CPU in every mode (module
    docstring), with its input quantisation shared through ``reuse``; elsewhere bitsandbytes' own forward."""

    minippo_fast = True

    def __init__(
        self, layer: bnb.nn.Linear8bitLt, reuse: Int8InputReuse | None, int8_backward: bool
    ):
        super().__init__(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            has_fp16_weights=False,
            threshold=layer.state.threshold,
            device="meta",
        )
        self.weight = layer.weight
        self.bias = layer.bias
        self.state = layer.state
        if hasattr(layer, "source_cls"):
            self.source_cls = layer.source_cls
        self.reuse = reuse
        self.int8_backward = int8_backward
        self.train(layer.training)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _Int8Linear.apply(x, self)

    def extra_repr(self) -> str:
        grad = "int8" if self.int8_backward else "exact"
        reuse = "shared" if self.reuse else "own"
        return f"{super().extra_repr()}, input_quantisation={reuse}, input_grad={grad}"


def int8_matmul_is_native(device: torch.device | str) -> bool:
    """CUDA, or a CPU with VNNI or AMX; elsewhere torch's int8 GEMM is emulated, slower than float32."""
    cpu = torch.cpu
    if torch.device(device).type != "cpu":
        return True
    return cpu._is_vnni_supported() or cpu._is_amx_tile_supported()
