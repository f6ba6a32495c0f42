"""optiserve.kernels: the numerics of post-training quantization.

One small dataclass per format (`qdata`, `scale`, `per_tensor_scale` where the format has one, `from_float`,
`dequantize`), each with a plain-torch reference and a Triton kernel that gives the same bits, plus fused
dequantize-GEMMs for NVFP4 and INT4 weights. Numerics follow NVIDIA ModelOpt; see each module's docstring.
The Triton path runs for CUDA tensors, or on CPU when TRITON_INTERPRET=1 was set before this package was imported
and the caller passes `use_kernel=True`.
"""

from .fp8 import FP8Tensor
from .gemm import int4_linear, nvfp4_linear
from .int4 import Int4Tensor
from .int8 import Int8Tensor
from .nvfp4 import NVFP4Tensor, nvfp4_per_tensor_scale, quantize_nvfp4_activation

__all__ = [
    "FP8Tensor",
    "Int4Tensor",
    "Int8Tensor",
    "NVFP4Tensor",
    "int4_linear",
    "nvfp4_linear",
    "nvfp4_per_tensor_scale",
    "quantize_nvfp4_activation",
]
