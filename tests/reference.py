"""The float32 oracle of every kernel test: kt_jit.reference (one implementation, shared with the
benchmarks' PyTorch baseline)."""

from kt_jit.reference import linear, linear_t, moe, rel_err

__all__ = ["linear", "linear_t", "moe", "rel_err"]
