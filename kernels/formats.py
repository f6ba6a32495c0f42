"""Named constants of the quantized number formats (NVFP4, FP8 E4M3, INT8, INT4).

Every value here follows NVIDIA ModelOpt (`modelopt/torch/quantization/qtensor/*.py`,
`modelopt/torch/quantization/utils/numeric_utils.py`, `modelopt/torch/export/quant_utils.py`).
This module has no torch/triton imports so it can be read by anything.
"""

from __future__ import annotations

# --- FP4 E2M1 (the element type of NVFP4) -------------------------------------------------------------------------
# A 4-bit code is `sign << 3 | magnitude_index`; magnitude_index indexes E2M1_VALUES.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX: float = 6.0
E2M1_SIGN_BIT: int = 0x8
# Rounding thresholds between neighbouring magnitudes (ModelOpt `e2m1_bounds`). A value exactly on a bound goes to
# the neighbour with the even code: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5.0->4.0.
E2M1_BOUNDS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

# --- FP8 E4M3 (OCP "fn" variant: no inf, NaN = 0x7F / 0xFF) --------------------------------------------------------
FP8_E4M3_MAX: float = 448.0
FP8_E4M3_MIN_SUBNORMAL: float = 2.0**-9  # smallest positive E4M3 value; also the NVFP4 block-scale floor
FP8_E4M3_MIN_NORMAL: float = 2.0**-6
FP8_E4M3_BIAS: int = 7
FP8_E4M3_NAN: int = 0x7F

# --- NVFP4 ----------------------------------------------------------------------------------------------------------
NVFP4_BLOCK_SIZE: int = 16  # elements per FP8 block scale, along the last (input) dim
NVFP4_SCALE_MIN: float = FP8_E4M3_MIN_SUBNORMAL  # block scale clamp range before the FP8 cast
NVFP4_SCALE_MAX: float = FP8_E4M3_MAX
NVFP4_GLOBAL_DIVISOR: float = E2M1_MAX * FP8_E4M3_MAX  # per-tensor scale s2 = amax / (6 * 448) = amax / 2688
# The KV-cache encoder (`nvfp4_kv.py`) tries these multiples of the standard block scale amax_block / (6 * s2) and
# keeps, per block, the one with the least squared error: < 1 clips the block's largest values, > 1 maps the block
# max below 6 (E2M1's top step, 4 -> 6, is coarse). 1.0 comes first so that a tie keeps ModelOpt's encoding.
NVFP4_KV_SCALE_FACTORS: tuple[float, ...] = (1.0, 0.8, 0.85, 0.9, 0.95, 1.1, 1.2, 1.3, 1.4, 1.5)

# --- INT8 -----------------------------------------------------------------------------------------------------------
INT8_MAXBOUND: float = 127.0  # scale = amax / 127 (ModelOpt `amax / 127.0`)
INT8_MIN: int = -128  # ModelOpt clamps to the full int8 range [-128, 127]
INT8_MAX: int = 127

# --- INT4 (AWQ export layout) ---------------------------------------------------------------------------------------
INT4_GROUP_SIZE: int = 128  # elements per scale along the input dim
INT4_MAXBOUND: float = 7.0  # scale = amax_group / 7 (ModelOpt `maxbound` for 4 bits)
INT4_MIN: int = -8
INT4_MAX: int = 7

# Scale used for an all-zero block / group / row / tensor so that the division is defined (ModelOpt sets 1.0).
ZERO_AMAX_SCALE: float = 1.0
