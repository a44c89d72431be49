"""Token grouping per expert.

The T*K (token, slot) pairs are sorted by expert (stable), and each active expert gets a segment
of rows in the per-expert buffers. Segments start at multiples of 16 rows so that every segment
is whole AMX tiles (rows past a segment's end are never read back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SEGMENT_ALIGN = 16


@dataclass
class Routing:
    """Where each routed (token, k) pair lives in the per-expert row buffers (int64 NumPy arrays:
    the host side of a call works on NumPy, which costs far less per small operation than torch;
    kernels take the arrays' addresses).

    slot_token[j], slot_k[j]: token and k of the j-th pair in expert order (j < T*K)
    slot_row[j]: its row in the per-expert buffers (``rows`` rows in all)
    row_of[t, k]: the row of pair (t, k) (the inverse view, [T, K])
    experts, counts, starts: the active experts, their token counts and first rows
    """

    slot_token: np.ndarray
    slot_k: np.ndarray
    slot_row: np.ndarray
    row_of: np.ndarray
    experts: np.ndarray
    counts: np.ndarray
    starts: np.ndarray
    rows: int


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Group ``topk_ids [T, K]`` (int64, contiguous, already validated to lie in [0, E)) by expert.

    Done in NumPy: for the few hundred ids of a decode step, a dozen small torch ops cost more
    than the expert GEMMs' launch.
    """
    t, k = topk_ids.shape
    flat = topk_ids.numpy().reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts_all = np.bincount(flat, minlength=num_experts)
    experts = np.flatnonzero(counts_all)
    counts = counts_all[experts]
    padded = (counts + SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
    starts = np.cumsum(padded) - padded
    first_slot = np.cumsum(counts) - counts  # position of each segment in sorted order
    # row of sorted slot j = starts[seg(j)] + (j - first_slot[seg(j)])
    slot_row = np.arange(t * k) + np.repeat(starts - first_slot, counts)
    rows = int(starts[-1] + padded[-1]) if experts.size else 0
    row_of = np.empty(t * k, dtype=np.int64)
    row_of[order] = slot_row
    slot_token, slot_k = np.divmod(order, k)
    return Routing(slot_token, slot_k, slot_row, row_of.reshape(t, k), experts, counts, starts, rows)
