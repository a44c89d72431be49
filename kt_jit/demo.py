"""``python -m kt_jit.demo``: LoRA fine-tuning of a small MoE stack, kt_jit next to plain PyTorch.

The model is a stack of MoE blocks (RMSNorm -> softmax top-k router -> routed experts, residual)
with frozen random experts. A *teacher* is the same model with non-zero LoRA adapters; the
*student* starts from fresh adapters (B = 0) and a perturbed router and learns, with AdamW, to
reproduce the teacher's outputs on a fixed batch of synthetic token embeddings. The router is
trained through the experts' routing-weight gradient.

The same student is trained twice from the same start: with kt_jit.moe_sft, and with the PyTorch
reference (kt_jit.reference.moe in bf16, autograd, a per-expert loop) for a few steps to time it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import kt_jit
from kt_jit.reference import moe as torch_moe


class MoEBlock(nn.Module):
    def __init__(self, experts: kt_jit.MoEExperts, dense: tuple[torch.Tensor, ...], top_k: int, rank: int,
                 seed: int) -> None:
        super().__init__()
        e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
        g = torch.Generator().manual_seed(seed)
        self.experts, self.dense, self.top_k = experts, dense, top_k
        self.norm = nn.RMSNorm(h)
        self.router = nn.Linear(h, e, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(e, h, generator=g) / h**0.5)
        self.lora = kt_jit.MoELoRA(e, h, i, rank=rank, alpha=2.0 * rank)
        self.use_torch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        probs = torch.softmax(self.router(h), -1)
        weights, ids = probs.topk(self.top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.use_torch:
            out = torch_moe(h, ids, weights, *self.dense, list(self.lora.tensors()), self.lora.scaling,
                            dtype=torch.bfloat16)
        else:
            out = kt_jit.moe_sft(h.bfloat16(), ids, weights, self.experts, self.lora)
        return x + out


def build(layers: int, e: int, h: int, i: int, k: int, rank: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    g = torch.Generator().manual_seed(0)
    student, teacher = nn.ModuleList(), nn.ModuleList()
    for layer in range(layers):
        gate = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
        up = (torch.randn(e, i, h, generator=g) / h**0.5).bfloat16()
        down = (torch.randn(e, h, i, generator=g) / i**0.5 * 0.5).bfloat16()
        experts = kt_jit.MoEExperts.from_tensors(gate, up, down)
        student.append(MoEBlock(experts, (gate, up, down), k, rank, seed=100 + layer))
        teacher.append(MoEBlock(experts, (gate, up, down), k, rank, seed=100 + layer))
        with torch.no_grad():  # the teacher has real adapters and a slightly different router
            for name in ("gate_lora_b", "up_lora_b", "down_lora_b"):
                getattr(teacher[-1].lora, name).normal_(0, 0.05, generator=g)
            teacher[-1].router.weight.add_(torch.randn(e, h, generator=g) * 0.3 / h**0.5)
    return student, teacher


def run(model: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in model:
        x = block(x)
    return x


def bar(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / total)
    return "[" + "#" * done + "." * (width - done) + "]"


def train(model: nn.ModuleList, x: torch.Tensor, target: torch.Tensor, steps: int, use_torch: bool,
          label: str, lr: float) -> tuple[list[float], list[float]]:
    for block in model:
        block.use_torch = use_torch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, times = [], []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss = (run(model, x) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        tok_s = x.shape[0] / statistics.median(times)
        sys.stdout.write(f"\r  {label:<8} {bar(step, steps)} step {step:3d}/{steps}  loss {losses[-1]:.5f}  "
                         f"{tok_s:8.0f} tokens/s")
        sys.stdout.flush()
    sys.stdout.write("\n")
    return losses, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--torch-steps", type=int, default=4, help="steps of the PyTorch reference (for speed)")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    print(f"kt_jit {kt_jit.__version__} demo | kernels: {kt_jit.active_isa()} | "
          f"{args.layers} MoE layers x {args.experts} experts (H={args.hidden}, I={args.intermediate}, "
          f"top-{args.top_k}), LoRA rank {args.rank}, {args.tokens} tokens per step")
    t0 = time.perf_counter()
    student, teacher = build(args.layers, args.experts, args.hidden, args.intermediate, args.top_k, args.rank)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = run(teacher, x)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    weights_gb = sum(b.experts.nbytes for b in student) / 1e9
    print(f"built in {time.perf_counter() - t0:.1f} s ({weights_gb:.2f} GB of packed experts); "
          f"first steps include JIT compilation ({kt_jit.cache_info()['dir']})")

    ours, ours_t = train(student, x, target, args.steps, False, "kt_jit", args.lr)
    student.load_state_dict(start)
    ref, ref_t = train(student, x, target, args.torch_steps, True, "pytorch", args.lr)

    warm = ours_t[2:] or ours_t
    ours_tps = args.tokens / statistics.median(warm)
    ref_tps = args.tokens / statistics.median(ref_t[1:] or ref_t)
    print(f"\nloss: {ours[0]:.5f} -> {ours[-1]:.5f} over {args.steps} steps "
          f"({100 * (1 - ours[-1] / ours[0]):.0f}% lower)")
    n = min(len(ref), len(ours))
    drift = max(abs(a - b) / b for a, b in zip(ours[:n], ref[:n], strict=True))
    print(f"first {n} steps match the PyTorch reference within {100 * drift:.2f}% (loss)")
    print(f"speed: kt_jit {ours_tps:,.0f} tokens/s, PyTorch {ref_tps:,.0f} tokens/s -> "
          f"{ours_tps / ref_tps:.1f}x (training step: forward + backward + AdamW, {args.layers} layers)")
    return 0 if ours[-1] < ours[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
