"""Lowering: text-IR builder, AMX/AVX-512 emitters, compilation and the on-disk kernel cache."""

from .cache import CODEGEN_VERSION, cache_info, clear_cache

__all__ = ["CODEGEN_VERSION", "cache_info", "clear_cache"]
