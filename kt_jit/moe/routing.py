"""Token grouping per expert.

The T*K (token, slot) pairs are sorted by expert (stable), and each active expert gets a segment
of rows in the per-expert buffers. Segments start at multiples of 16 rows so that every segment
is whole AMX tiles (rows past a segment's end are never read back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..codegen.plan import Span
from ..kernels.route import out_size, regions, route_into

SEGMENT_ALIGN = 16


@dataclass
class Routing:
    """Where each routed (token, k) pair lives in the per-expert row buffers (int64 NumPy arrays,
    views of the routing kernel's output: the host side of a call works on NumPy, which costs far
    less per small operation than torch; kernels take the arrays' addresses).

    slot_token[j], slot_k[j]: token and k of the j-th pair in expert order (j < T*K)
    slot_row[j]: its row in the per-expert buffers (``rows`` rows in all); slot_expert[j]: its expert
    row_of[t, k]: the row of pair (t, k) (the inverse view, [T, K])
    basis [A, 4]: per active expert (1, first row, expert id, row count), the per-expert terms of
    every group-descriptor column (moe/sft.py builds each launch's table as basis @ coefficients)
    """

    slot_token: np.ndarray
    slot_k: np.ndarray
    slot_row: np.ndarray
    slot_expert: np.ndarray
    row_of: np.ndarray
    basis: np.ndarray
    rows: int

    def __post_init__(self) -> None:
        # the addresses kernels take, once (NumPy's .ctypes costs a few microseconds per access)
        self.slot_token_addr, self.slot_k_addr, self.slot_row_addr, self.row_of_addr, self.slot_expert_addr = (
            a.__array_interface__["data"][0]
            for a in (self.slot_token, self.slot_k, self.slot_row, self.row_of, self.slot_expert))
        # the arrays kernels address, as launch-plan operands (codegen/plan.py)
        nbytes = self.slot_row.nbytes
        self.spans = [Span(a, nbytes) for a in (self.slot_token_addr, self.slot_k_addr, self.slot_row_addr,
                                                 self.row_of_addr, self.slot_expert_addr)]

    def __setstate__(self, state: dict) -> None:  # copies and unpickled ones: their own arrays' addresses
        self.__dict__.update(state)
        self.__post_init__()

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


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Group ``topk_ids [T, K]`` (int64, contiguous) by expert, stably (pairs of one expert keep their
    token order), in one compiled call (kernels/route.py). Ids outside [0, E) raise ValueError."""
    t, k = topk_ids.shape
    n, e = t * k, num_experts
    buf = np.empty(out_size(n, e), dtype=np.int64)
    route_into(topk_ids.data_ptr(), n, k, e, SEGMENT_ALIGN, buf.ctypes.data)
    if buf[2]:
        ids = topk_ids.numpy()
        raise ValueError(f"topk_ids holds expert ids in [{ids.min()}, {ids.max()}] but there are only {e} experts "
                         f"(valid ids: 0..{e - 1})")
    v = regions(buf, n, e)
    return Routing(v["slot_token"], v["slot_k"], v["slot_row"], v["slot_expert"], v["row_of"].reshape(t, k),
                   v["basis"], int(buf[1]))
