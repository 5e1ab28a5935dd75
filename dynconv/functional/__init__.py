"""Per-sample convolution machinery shared by every dynamic operator: the routines that compute a batch with
one kernel (or one mixture of kernels) per sample, their exact algorithms, and the one selector that chooses
between them (`selector.py`)."""

from dynconv.functional.mixture import mixture_conv2d
from dynconv.functional.per_sample import conv_output_size, per_sample_conv2d
from dynconv.functional.selector import counting_macs, is_counting_macs

__all__ = ["conv_output_size", "counting_macs", "is_counting_macs", "mixture_conv2d", "per_sample_conv2d"]
