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
    """Where each routed (token, k) pair lives in the per-expert row buffers.

    slot_token[j], slot_k[j]: token and k of the j-th pair in expert order (j < T*K)
    slot_row[j]: its row in the per-expert buffers (``rows`` rows in all)
    row_of[t, k]: the row of pair (t, k) (the inverse view, [T, K])
    experts, counts, starts: the active experts, their token counts and first rows (all int64)
    """

    slot_token: torch.Tensor
    slot_k: torch.Tensor
    slot_row: torch.Tensor
    row_of: torch.Tensor
    experts: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    rows: int

    def __post_init__(self) -> None:
        # NumPy views for building kernel group tables (far cheaper than small torch ops)
        self.experts_np = self.experts.numpy()
        self.counts_np = self.counts.numpy()
        self.starts_np = self.starts.numpy()


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Group ``topk_ids [T, K]`` (int64, already validated to lie in [0, E)) by expert.

    Done in NumPy: for the few hundred ids of a decode step, a dozen small torch ops cost more
    than the expert GEMMs' launch.
    """
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).numpy()
    order = np.argsort(flat, kind="stable")
    counts_all = np.bincount(flat, minlength=num_experts)
    experts = np.nonzero(counts_all)[0]
    counts = counts_all[experts]
    padded = (counts + SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
    starts = np.cumsum(padded) - padded
    first_slot = np.cumsum(counts) - counts  # position of each segment in sorted order
    # row of sorted slot j = starts[seg(j)] + (j - first_slot[seg(j)])
    seg = np.repeat(np.arange(experts.size), counts)
    slot_row = starts[seg] + np.arange(t * k) - first_slot[seg]
    rows = int(padded.sum()) if experts.size else 0
    row_of = np.empty(t * k, dtype=np.int64)
    row_of[order] = slot_row
    tt = torch.from_numpy
    return Routing(tt(order // k), tt(order % k), tt(slot_row), tt(row_of.reshape(t, k)),
                   tt(experts), tt(counts), tt(starts), rows)
