"""Token grouping per expert.

The T*K (token, slot) pairs are sorted by expert (stable), and each active expert gets a segment
of rows in the per-expert buffers. Segments start at multiples of 16 rows so that every segment
is whole AMX tiles (rows past a segment's end are never read back).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..codegen.plan import Span
from ..kernels.route import HEADER, PAIR_REGIONS, out_size, pair_region, regions, route_into
from ..runtime.buffers import array_address

SEGMENT_ALIGN = 16


class Routing:
    """Where each routed (token, k) pair lives in the per-expert row buffers: the routing kernel's
    output buffer (int64, kernels/route.py) and what the host side reads of it.

    At decode sizes every small host step of a call costs 5-10x its warm time (a weight stream has
    just emptied the caches), so a routing holds ints and one NumPy view; the per-pair arrays are
    views made on demand (tests, debugging): kernels take their addresses.

    ``basis`` [A, 4]: per active expert (1, first row, expert id, row count), the per-expert terms
    of every group-descriptor column (moe/sft.py builds each launch's table as basis @ coefficients).
    ``rows``: rows of the per-expert buffers; ``pairs`` = T*K. Per-pair arrays (views):
    slot_token[j], slot_k[j]: token and k of the j-th pair in expert order; slot_row[j]: its row;
    slot_expert[j]: its expert; row_of[t, k]: the row of pair (t, k) ([T, K]).
    """

    def __init__(self, buf: np.ndarray, tokens: int, k: int, num_experts: int) -> None:
        self.buf, self.tokens, self.k, self.num_experts = buf, tokens, k, num_experts
        self._place()

    def _place(self) -> None:
        """Addresses and views of ``buf`` (again after a copy, which owns a new buffer)."""
        n, e = self.tokens * self.k, self.num_experts
        active, self.rows = self.buf[:2].tolist()
        self.pairs = n
        self.basis = self.buf[HEADER:HEADER + 4 * active].reshape(active, 4)
        base = array_address(self.buf)
        offsets = _pair_offsets(n, e)
        self.slot_token_addr, self.slot_k_addr, self.slot_row_addr, self.row_of_addr, self.slot_expert_addr = (
            base + off for off in offsets[:5])
        # the per-pair arrays as one launch-plan operand (codegen/plan.py)
        self.spans = [Span(base + offsets[5], 8 * n * len(PAIR_REGIONS))]

    def __getstate__(self) -> dict:
        return {"buf": self.buf, "tokens": self.tokens, "k": self.k, "num_experts": self.num_experts}

    def __setstate__(self, state: dict) -> None:  # copies and unpickled ones: their own buffer's addresses
        self.__dict__.update(state)
        self._place()

    def _regions(self) -> dict:
        return regions(self.buf, self.pairs, self.num_experts)

    slot_token = property(lambda self: self._regions()["slot_token"])
    slot_k = property(lambda self: self._regions()["slot_k"])
    slot_row = property(lambda self: self._regions()["slot_row"])
    slot_expert = property(lambda self: self._regions()["slot_expert"])
    row_of = property(lambda self: self._regions()["row_of"].reshape(self.tokens, self.k))

    @property
    def starts(self) -> np.ndarray:
        """First row of each active expert's segment."""
        return self.basis[:, 1]

    @property
    def experts(self) -> np.ndarray:
        """The active experts, in id order."""
        return self.basis[:, 2]

    @property
    def counts(self) -> np.ndarray:
        """Each active expert's routed pairs."""
        return self.basis[:, 3]


@functools.lru_cache(maxsize=64)
def _pair_offsets(n: int, e: int) -> tuple[int, ...]:
    """Byte offsets in a routing's buffer of slot_token, slot_k, slot_row, row_of and slot_expert,
    then of the first per-pair region (one call: at decode sizes each small host step is costly)."""
    names = ("slot_token", "slot_k", "slot_row", "row_of", "slot_expert", PAIR_REGIONS[0])
    return tuple(8 * pair_region(name, n, e) for name in names)


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Group ``topk_ids [T, K]`` (int64, contiguous) by expert, stably (pairs of one expert keep their
    token order), in one compiled call (kernels/route.py). Ids outside [0, E) raise ValueError."""
    t, k = topk_ids.shape
    n, e = t * k, num_experts
    buf = np.empty(out_size(n, e), dtype=np.int64)
    route_into(topk_ids.data_ptr(), n, k, e, SEGMENT_ALIGN, array_address(buf))
    if buf[2]:
        ids = topk_ids.numpy()
        raise ValueError(f"topk_ids holds expert ids in [{ids.min()}, {ids.max()}] but there are only {e} experts "
                         f"(valid ids: 0..{e - 1})")
    return Routing(buf, t, k, e)
