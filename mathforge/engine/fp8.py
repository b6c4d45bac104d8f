"""FP8 (e4m3) W8A8 linear layers with per-tensor static scales, ModelOpt FP8_DEFAULT_CFG semantics.

Scales are dequantisation multipliers: x_fp8 = sat(x / s), x ≈ x_fp8 * s; scale = amax / 448.
On CUDA the matmul is one `torch._scaled_mm` (tensor-wise scales, fp32 accumulation), or for few rows
(decode) the Triton GEMV of `mathforge.engine.kernels` when it measures faster (same arithmetic: fp8
products are exact in fp32); elsewhere an
exact emulation: the same activation quantisation, then an fp32 matmul of the fp8 values (their
products are exact in fp32) and the same scale/bias epilogue — equal to the GPU result up to
accumulation order.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # an all-zero tensor still gets a usable (non-zero) scale


def amax_to_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor scale (float32 scalar) for a tensor whose max |value| is `amax`."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    return torch.clamp(a / FP8_MAX, min=_MIN_SCALE)


def quantize_tensor(t: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """t / scale, saturated to ±448, cast to float8_e4m3fn (round to nearest even)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=t.device)
    return (t.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_tensor(
    q: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=q.device)
    return (q.float() * s).to(dtype)


class KernelLinear(nn.Module):
    """A quantised Linear: BF16 inputs go through mathforge.engine.kernels.linear (on CUDA with few rows,
    the faster of a Triton GEMV and the library matmul for this shape), others through `_eager`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, weight_dtype, device, dtype):
        """The quantised weight [out, in] (its scales are the subclass's) and an optional bias in `dtype`."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=weight_dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    def _eager(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mathforge.engine import kernels

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.bfloat16:
            return self._eager(x2).reshape(*shape[:-1], self.out_features)
        return kernels.linear(x2, self).reshape(*shape[:-1], self.out_features)


class FP8Linear(KernelLinear):
    """y = (sat(x / input_scale) @ W_fp8^T) * input_scale * weight_scale + bias, output in x's dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, device=None, dtype=torch.bfloat16
    ):
        super().__init__(in_features, out_features, bias, weight_dtype=FP8_DTYPE, device=device, dtype=dtype)
        self.weight_scale = nn.Parameter(
            torch.ones((), dtype=torch.float32, device=device), requires_grad=False
        )
        self.input_scale = nn.Parameter(
            torch.ones((), dtype=torch.float32, device=device), requires_grad=False
        )

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | float,
        weight_scale: torch.Tensor | float | None = None,
    ) -> FP8Linear:
        """Quantise a float weight (weight_scale from its amax unless given)."""
        ws = (
            amax_to_scale(weight.abs().max().float())
            if weight_scale is None
            else torch.as_tensor(weight_scale, dtype=torch.float32)
        )
        m = cls(
            weight.shape[1],
            weight.shape[0],
            bias is not None,
            device=weight.device,
            dtype=bias.dtype if bias is not None else torch.bfloat16,
        )
        m.weight.data = quantize_tensor(weight, ws)
        m.weight_scale.data = ws.reshape(()).to(weight.device)
        m.input_scale.data = torch.as_tensor(input_scale, dtype=torch.float32).reshape(()).to(weight.device)
        if bias is not None:
            m.bias.data = bias.detach().clone()
        return m

    def _eager(self, x2: torch.Tensor) -> torch.Tensor:
        """[M, K] -> [M, N]: one `torch._scaled_mm` on CUDA, the exact emulation elsewhere."""
        xq = quantize_tensor(x2, self.input_scale)
        if x2.is_cuda:
            out_dtype = (
                x2.dtype if x2.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
            )
            bias = self.bias.to(out_dtype) if self.bias is not None and out_dtype != torch.float32 else None
            y = torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=self.input_scale,
                scale_b=self.weight_scale,
                bias=bias,
                out_dtype=out_dtype,
            )
            if self.bias is not None and bias is None:  # fp32 output: cuBLASLt takes no bias here
                y = y + self.bias.float()
        else:
            y = (xq.float() @ self._widened_weight().t()) * (self.input_scale * self.weight_scale)
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(x2.dtype)

    def _widened_weight(self) -> torch.Tensor:
        """The fp8 weight as float32, widened once per weight version: on CPU the fp8 -> float32 cast is
        scalar code (~7 ns an element), and re-widening every step made fp8 decode ~4x slower than fp32."""
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version)  # inference tensors have no version
        if getattr(self, "_widened_key", None) != key:
            self._widened, self._widened_key = w.float(), key
        return self._widened

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8_e4m3"
