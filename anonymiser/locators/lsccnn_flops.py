"""LSC-CNN's arithmetic per photo, counted from the spec's layer table (benchmarks: achieved TFLOP/s)."""

from __future__ import annotations

from .lsccnn_net import _LAYERS, INPUT_MULTIPLE


#: Input stride of every layer, from the data flow of spec §1.3 (the channel counts and kinds come
#: from the layer table of spec §1.2, transcribed in ``lsccnn_net._LAYERS``). A 3x3 convolution
#: keeps its input's resolution; a transposed one enlarges it by 2 (``t2``) or 4 (``t4``).
LAYER_INPUT_STRIDES: dict[str, int] = {
    **{f"conv1_{k}": 1 for k in (1, 2)},
    **{f"conv2_{k}": 2 for k in (1, 2)},
    **{f"conv3_{k}": 4 for k in (1, 2, 3)},
    **{f"conv4_{k}": 8 for k in (1, 2, 3)},
    **{f"conv5_{k}": 16 for k in (1, 2, 3)},
    "conv_before_transpose_1": 16,
    **{f"convA_{k}": 16 for k in range(1, 6)},
    **{f"convB_{k}": 8 for k in range(1, 6)},
    **{f"convC_{k}": 4 for k in range(1, 6)},
    **{f"convD_{k}": 2 for k in range(1, 6)},
    "transpose_1": 16, "conv_after_transpose_1_1": 8,
    "transpose_2": 8, "conv_after_transpose_2_1": 4,
    "transpose_3": 16, "conv_after_transpose_3_1": 4,
    "transpose_4_1_a": 16, "transpose_4_1_b": 4, "conv_after_transpose_4_1": 2,
    "transpose_4_2": 8, "conv_after_transpose_4_2": 2,
    "transpose_4_3": 4, "conv_after_transpose_4_3": 2,
    **{f"conv_middle_{k}": 8 for k in (1, 2, 3)}, "conv_mid_4": 8,
    **{f"conv_lowest_{k}": 4 for k in (1, 2, 3, 4)},
    **{f"conv_scale1_{k}": 2 for k in (1, 2, 3)},
}


def lsccnn_flops(height: int, width: int) -> int:
    """Floating-point operations (2 per multiply-accumulate) of one forward pass at ``height x width``.

    A 3x3 convolution costs ``9 * in * out`` MACs per output pixel; a transposed one ``9 * in *
    out`` per *input* pixel (each input pixel scatters one 3x3 kernel per output channel).
    Biases, ReLUs, poolings and the mean subtraction are left out (well under 0.1 %). About 359
    GMAC at 640x480, 4.9 TFLOP at 1920x1088.
    """
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
        raise ValueError("LSC-CNN input sides are multiples of 16")
    macs = 0
    for name, c_in, c_out, _kind in _LAYERS:
        d = LAYER_INPUT_STRIDES[name]
        macs += 9 * c_in * c_out * (height // d) * (width // d)
    return 2 * macs

