"""`python -m gla_ext bench`: a quick look at op speed per backend on this machine.

The full benchmarks (peers, rooflines, saved results) live in benchmarks/ of the source tree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._timing import time_fn
from .ops import chunk_gla, fused_recurrent_gla
from .selfcheck import available_backends


def run_quickbench(T: int = 1024) -> int:
    B, H, K, V = 1, 4, 64, 64
    print(f"shape B={B} T={T} H={H} K=V={K}, float32; median ms per call")
    print(f"{'op':20} {'backend':10} {'forward':>10} {'fwd+bwd':>10}")
    for backend, device in available_backends():
        for op in (chunk_gla, fused_recurrent_gla):
            if backend == "reference" and op is fused_recurrent_gla and T > 256:
                continue   # the token loop in Python is too slow to be worth the wait
            q, k, g = (torch.randn(B, T, H, K, device=device) for _ in range(3))
            g = F.logsigmoid(g) / 16
            v = torch.randn(B, T, H, V, device=device)
            fwd = time_fn(lambda: op(q, k, v, g, backend=backend), device, warmup=1, reps=3)
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
            fb = time_fn(lambda: op(*leaves, backend=backend)[0].sum().backward(), device,
                         warmup=1, reps=3)
            print(f"{op.__name__:20} {backend:10} {fwd * 1e3:10.2f} {fb * 1e3:10.2f}")
    return 0
