"""chunk_gla_cp over gloo on this CPU: bytes sent per call and the compute / communication split.

    python benchmarks/bench_cp.py [--ranks 2] [--reps 7] [--quick]

Spawns `ranks` processes (one thread each) on 127.0.0.1. For each shape it times, per rank and
call (median of reps, the slowest rank's):
  cp        chunk_gla_cp on the rank's slice (forward; forward + backward)
  local     chunk_gla on the same slice alone (the compute chunk_gla_cp starts with)
  comm      the collectives chunk_gla_cp issues, alone, with the same sizes
  extra     cp - local - comm: what context parallelism adds to the slice's own kernel work:
            ranks > 0 run the forward twice (pass 1 for the slice's final state, pass 2 from
            the entering state) and the backward computes the entering state's gradient
  single    chunk_gla on the whole sequence in one process (rank 0), for the speed-up
Bytes are counted from the tensors chunk_gla_cp actually hands to all_gather. Also prints the
cost model (bytes per rank vs activations) for B=1, T=1M, H=16, K=V=128 over 8 and 64 ranks.
Saves benchmarks/results/cp_gloo.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [  # B, T (whole sequence), H, K, V
    (1, 4096, 4, 64, 64),
    (1, 16384, 4, 64, 64),
    (1, 4096, 16, 128, 128),
]
QUICK_SHAPES = [(1, 2048, 4, 64, 64)]


def cost_model(W: int, B=1, T=1 << 20, H=16, K=128, V=128) -> dict:
    """Per rank and GLA layer, bf16 q/k/v/o and float32 g, state and decays (ring all_gather)."""
    state = B * H * K * V * 4
    decay = B * H * K * 4
    check = 8 * 8                      # the agreement all_gather: 8 float64 numbers
    T_i = T // W
    activ = B * T_i * H * (2 * K * 2 + K * 4 + 2 * V * 2)   # q, k, v, o bf16 + g float32
    fwd_sent = (W - 1) * (state + decay + check)              # each rank forwards W-1 blocks
    bwd_sent = (W - 1) * state
    return dict(ranks=W, tokens_per_rank=T_i, payload_fwd=state + decay + check,
                sent_fwd=fwd_sent, sent_bwd=bwd_sent, activations=activ,
                ratio=(fwd_sent + bwd_sent) / activ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_max(samples, group=None) -> float:
    """Median over reps on this rank, then the slowest rank's median."""
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _timed(fn, reps):
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _worker(rank, world, port, shapes, reps, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    import gla_ext.distributed as gd
    from gla_ext import chunk_gla
    sent = []
    real_gather = gd._all_gather

    def counting_gather(t, group, w):      # bytes this rank hands to all_gather
        sent.append(t.numel() * t.element_size())
        return real_gather(t, group, w)

    gd._all_gather = counting_gather
    rows = []
    for B, T, H, K, V in shapes:
        torch.manual_seed(0)
        q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
        v = torch.randn(B, T, H, V)
        g = F.logsigmoid(torch.randn(B, T, H, K)) / 16
        do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
        sl = [(c.start, c.stop) for c in _slices(T, world)][rank]
        mine = [x[:, sl[0]:sl[1]].clone() for x in (q, k, v, g)]
        my_do = do[:, sl[0]:sl[1]]
        leaves = [x.clone().requires_grad_() for x in mine]
        last = rank == world - 1

        def cp_fwd():
            with torch.no_grad():
                gd.chunk_gla_cp(*mine, output_final_state=True)

        def cp_fwd_bwd():
            o, ht = gd.chunk_gla_cp(*leaves, output_final_state=True)
            loss = (o * my_do).sum() + ((ht * dht).sum() if last else 0)
            loss.backward()

        def local_fwd():
            with torch.no_grad():
                chunk_gla(*mine, output_final_state=True)

        def local_fwd_bwd():
            o, ht = chunk_gla(*leaves, output_final_state=True)
            ((o * my_do).sum() + (ht * dht).sum()).backward()

        payload = torch.zeros(B * H * K * V + B * H * K)
        grad_payload = torch.zeros(B * H * K * V)
        check = torch.zeros(8, dtype=torch.float64)

        def comm_fwd():
            real_gather(check, dist.group.WORLD, world)
            real_gather(payload, dist.group.WORLD, world)

        def comm_fwd_bwd():
            comm_fwd()
            real_gather(grad_payload, dist.group.WORLD, world)

        for fn in (cp_fwd, cp_fwd_bwd, local_fwd, comm_fwd):   # warm up
            fn()
        sent.clear()
        cp_fwd()
        bytes_fwd = sum(sent)
        sent.clear()
        cp_fwd_bwd()
        bytes_fwd_bwd = sum(sent)
        res = {}
        for name, fn in (("cp_fwd", cp_fwd), ("local_fwd", local_fwd), ("comm_fwd", comm_fwd),
                         ("cp_fwd_bwd", cp_fwd_bwd), ("local_fwd_bwd", local_fwd_bwd),
                         ("comm_fwd_bwd", comm_fwd_bwd)):
            res[name] = _median_max(_timed(fn, reps))
        single = {}
        if rank == 0:
            full = [x.clone().requires_grad_() for x in (q, k, v, g)]

            def single_fwd():
                with torch.no_grad():
                    chunk_gla(q, k, v, g, output_final_state=True)

            def single_fwd_bwd():
                o, ht = chunk_gla(*full, output_final_state=True)
                ((o * do).sum() + (ht * dht).sum()).backward()

            single_fwd()
            single = {"single_fwd": statistics.median(_t(single_fwd, reps)),
                      "single_fwd_bwd": statistics.median(_t(single_fwd_bwd, reps))}
        dist.barrier()
        activ = sum(x.numel() * x.element_size() for x in mine) + my_do.numel() * 4   # + o
        rows.append(dict(B=B, T=T, H=H, K=K, V=V, ranks=world, tokens_per_rank=sl[1] - sl[0],
                         bytes_sent_fwd=(world - 1) * bytes_fwd,
                         bytes_sent_fwd_bwd=(world - 1) * bytes_fwd_bwd,
                         activation_bytes=activ, **res, **single))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _t(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _slices(T, world):
    bounds = [T * r // world for r in range(world + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _kib(n) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def plot(rows, path_png):
    """Per shape and pass: the context-parallel call split into local kernel, collectives and
    the rest, next to one process on the whole sequence (ms, slower rank)."""
    from common import pyplot
    plt = pyplot()
    if plt is None:
        return
    bars = [(r, mode) for r in rows for mode in ("fwd", "fwd_bwd")]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for part, color in (("local", "tab:blue"), ("comm", "tab:red"), ("extra", "tab:gray")):
        # older results name the rest "combine" (the einsum correction)
        h = [r.get(f"{part}_{mode}", r.get(f"combine_{mode}", 0.0) if part == "extra" else 0.0)
             * 1e3 for r, mode in bars]
        ax.bar([x - 0.2 for x in xs], h, 0.4, bottom=bottom, color=color, label=f"cp: {part}")
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.bar([x + 0.2 for x in xs], [r[f"single_{mode}"] * 1e3 for r, mode in bars], 0.4,
           color="tab:green", label="single process")
    ax.set_xticks(xs, [f"T={r['T']} H={r['H']} K={r['K']}\n{mode}" for r, mode in bars], fontsize=7)
    ax.set_ylabel("ms per call")
    ax.set_yscale("log")
    ax.set_title(f"context parallelism, gloo, {rows[0]['ranks']} ranks on CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    print(f"saved {path_png}")


def main() -> int:
    from common import machine, save_results
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(args.ranks, _free_port(), shapes, args.reps, queue),
             nprocs=args.ranks)
    rows = queue.get()

    lines = [f"chunk_gla_cp, gloo, {args.ranks} ranks x 1 thread, float32, gates logsigmoid/16; "
             "ms per call, slowest rank's median",
             f"{'B T H K V':<22}{'pass':<9}{'sent/rank':>11}{'activ/rank':>12}{'cp':>9}"
             f"{'local':>9}{'comm':>9}{'extra':>9}{'single':>9}{'speedup':>9}"]
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            cp, loc, com = r[f"cp_{mode}"], r[f"local_{mode}"], r[f"comm_{mode}"]
            single = r.get(f"single_{mode}")
            r[f"extra_{mode}"] = cp - loc - com
            lines.append(f"{r['B']} {r['T']} {r['H']} {r['K']} {r['V']:<10}{mode:<9}"
                         f"{_kib(r[f'bytes_sent_{mode}']):>11}{_kib(r['activation_bytes']):>12}"
                         f"{cp * 1e3:>9.2f}{loc * 1e3:>9.2f}{com * 1e3:>9.2f}"
                         f"{(cp - loc - com) * 1e3:>9.2f}{single * 1e3:>9.2f}"
                         f"{single / cp:>8.2f}x")
    lines += ["", "cost model per rank and GLA layer: B=1, T=1M tokens, H=16, K=V=128 (ring "
              "all_gather; bf16 q/k/v/o, float32 g/states)",
              f"{'ranks':>6}{'tokens/rank':>13}{'payload':>11}{'sent fwd':>11}{'sent bwd':>11}"
              f"{'activations':>13}{'comm/activ':>12}"]
    model_rows = []
    for W in (8, 64):
        c = cost_model(W)
        model_rows.append(c)
        lines.append(f"{W:>6}{c['tokens_per_rank']:>13}{_kib(c['payload_fwd']):>11}"
                     f"{_kib(c['sent_fwd']):>11}{_kib(c['sent_bwd']):>11}"
                     f"{_kib(c['activations']):>13}{c['ratio'] * 100:>11.2f}%")
    table = "\n".join(lines)
    print(table)
    m = machine()
    print(f"{m['cpu']}, torch {m['torch']}")
    name = "cp_gloo_quick" if args.quick else "cp_gloo"
    load = os.getloadavg()
    print(f"load average during the run (1/5/15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores (other processes share them: times are noisy)")
    table += f"\nload average at the end (1/5/15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, " \
             f"{os.cpu_count()} cores"
    path = save_results(name, rows, table, extra={"cost_model": model_rows, "load_avg": load,
                                                  "ranks": args.ranks, "reps": args.reps})
    print(f"saved {path}")
    plot(rows, path.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
