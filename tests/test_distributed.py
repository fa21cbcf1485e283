"""Context parallelism (gla_ext.distributed) and data parallelism, on CPU processes over gloo.

Each test spawns 2-4 processes (torch.multiprocessing, gloo on 127.0.0.1, a free port); every
process group and the join have timeouts, so a bug fails instead of hanging. Workers are
module-level functions (spawn pickles them by name) and run many checks per spawn, because
starting processes (importing torch) is what costs time here: one spawn per group size. Every rank builds the same full inputs from one
seed, runs the single-process op / model on them, and compares its own slice.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_TIMEOUT = datetime.timedelta(seconds=60)
JOIN_TIMEOUT = 150.0

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# ---- process plumbing ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args) -> None:
    """Runs fn(rank, world, port, *args) in `world` processes; fails (never hangs) on any error."""
    ctx = mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{fn.__name__}: {world} processes still running after "
                                     f"{JOIN_TIMEOUT:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def _entry(rank, fn, world, port, args):
    torch.set_num_threads(1)          # the ranks share this machine's cores
    sys.path.insert(0, ROOT)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=PG_TIMEOUT)
    try:
        fn(rank, world, *args)
        # No rank tears gloo down while another still talks to it: a clean-clone CI run once
        # saw one rank of the 3-rank test abort ("terminate called without an active
        # exception") after the others had passed; not reproduced in 20 reruns.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rel(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    assert torch.isfinite(x).all(), "non-finite values"
    d, n = (x - ref).norm().item(), ref.norm().item()
    return d / n if n > 0 else d


def bounds(slices, rank):
    lo = sum(slices[:rank])
    return lo, lo + slices[rank]


# ---- chunk_gla_cp vs chunk_gla on the whole sequence ---------------------------------------

def full_inputs(seed, T, B, H, K, V, dtype, gate):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    g = F.logsigmoid(r(B, T, H, K))
    if gate == "mixed":              # full forget (-inf), no decay (0) among drawn gates
        u = torch.rand(B, T, H, K, generator=gen)
        g = torch.where(u < 0.1, float("-inf"), torch.where(u < 0.25, 0.0, g))
    else:
        g = g / gate
    h0, do, dht = r(B, H, K, V), r(B, T, H, V), r(B, H, K, V)
    return ([x.to(dtype) for x in (q, k, v)] + [g.to(acc)], h0.to(acc), do.to(dtype), dht.to(acc))


def check_case(rank, world, case):
    from gla_ext import chunk_gla
    from gla_ext.distributed import chunk_gla_cp
    slices, dtype = case["slices"], case["dtype"]
    B, H, K, V = case["shape"]
    use_h0, want_final = case["h0"], bool(case["final"])
    last = rank == world - 1
    # final="last": only the last rank asks for it (the flag is read there only)
    ask_final = last if case["final"] == "last" else want_final
    qkvg, h0, do, dht = full_inputs(case["seed"], sum(slices), B, H, K, V, dtype, case["gate"])
    # single process, whole sequence (float64 whatever the dtype under test)
    leaves = [x.double().clone().requires_grad_() for x in qkvg]
    h0_ref = h0.double().clone().requires_grad_() if use_h0 else None
    o, ht = chunk_gla(*leaves, initial_state=h0_ref, output_final_state=True)
    ((o * do.double()).sum() + (ht * dht.double()).sum() * want_final).backward()
    # this rank's slice
    lo, hi = bounds(slices, rank)
    mine = [x[:, lo:hi].clone().requires_grad_() for x in qkvg]
    my_h0 = h0.clone().requires_grad_() if use_h0 and rank == 0 else None
    o_cp, ht_cp = chunk_gla_cp(*mine, initial_state=my_h0, output_final_state=ask_final)
    assert (ht_cp is not None) == (want_final and last), "final state on the wrong rank"
    assert o_cp.shape == (B, hi - lo, H, V) and o_cp.dtype == dtype
    loss = (o_cp * do[:, lo:hi]).sum()
    if ht_cp is not None:
        loss = loss + (ht_cp * dht).sum()
    loss.backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    errs = {"o": rel(o_cp, o[:, lo:hi])}
    if ht_cp is not None:
        errs["final_state"] = rel(ht_cp, ht)
    for name, a, b in zip("qkvg", mine, leaves):
        errs["d" + name] = rel(a.grad, b.grad[:, lo:hi])
    if my_h0 is not None:
        errs["dh0"] = rel(my_h0.grad, h0_ref.grad)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"rank {rank} {case}: {worst} rel err {errs[worst]:.2e} > {tol}"


def worker_ops(rank, world, cases):
    for case in cases:
        check_case(rank, world, case)


def _case(seed, slices, shape=(2, 2, 16, 16), dtype=torch.float32, gate=1.0, h0=True, final=True):
    return dict(seed=seed, slices=slices, shape=shape, dtype=dtype, gate=gate, h0=h0, final=final)


# uneven slices crossing chunk boundaries (64), empty slices, K != V, weak (16) and strong (0.1)
# decay, full-forget gates, with and without h0 / final state, float32, float64 and bfloat16
OP_CASES = {
    2: [_case(1, [70, 9], gate=16), _case(2, [0, 33], shape=(1, 3, 8, 24), gate=0.1),
        _case(3, [65, 64], dtype=torch.float64, gate=16), _case(4, [5, 0], h0=False),
        _case(5, [40, 90], shape=(2, 2, 32, 8), gate="mixed", final=False),
        _case(6, [50, 78], dtype=torch.bfloat16, gate=16)],
    3: [_case(11, [40, 0, 27], shape=(2, 2, 8, 12), gate=0.1),
        _case(12, [1, 70, 130], dtype=torch.float64, gate=16, h0=False),
        _case(13, [20, 20, 0], shape=(1, 2, 16, 40), gate=16, final="last")],
    4: [_case(21, [17, 64, 1, 50], shape=(2, 2, 24, 8), gate=16),
        _case(22, [0, 30, 0, 9], dtype=torch.float64, shape=(1, 2, 8, 16), gate=0.1),
        _case(23, [33, 12, 70, 2], gate="mixed", shape=(1, 1, 16, 16))],
}


def test_chunk_gla_cp_4_ranks():
    run_ranks(worker_ops, 4, OP_CASES[4])


# ---- the model with cp_group; bad use raises on every rank ---------------------------------

def tiny_model(seed=0, **kw):
    from gla_ext import GLA
    torch.manual_seed(seed)
    opts = dict(embed_dim=24, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                dropout=0.0, seq_len=None)
    opts.update(kw)
    return GLA.build(**opts)


def expect_error(fn, *needles):
    try:
        fn()
    except ValueError as e:
        for n in needles:
            assert n in str(e), f"{n!r} not in error: {e}"
        return str(e)
    raise AssertionError("no error raised")


def worker_model(rank, world, slices):
    from gla_ext.distributed import chunk_gla_cp
    group = dist.new_group(list(range(world)))         # a group other than the world
    for kw in (dict(), dict(gate_low_rank_dim=4, gate_logit_normalizer=1)):
        model = tiny_model(**kw)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2, sum(slices), 24, generator=gen)
        w = torch.randn(2, sum(slices), 32, generator=gen)
        y = model(x, return_sequence=True)
        (y * w).sum().backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        lo, hi = bounds(slices, rank)
        y_cp = model(x[:, lo:hi], cp_group=group, return_sequence=True)
        assert y_cp.shape == (2, hi - lo, 32)
        if hi > lo:
            assert rel(y_cp, y[:, lo:hi]) <= 1e-5, f"rank {rank}: model output differs"
        (y_cp * w[:, lo:hi]).sum().backward()
        for n, p in model.named_parameters():      # per-rank slice contributions sum to the whole
            dist.all_reduce(p.grad, group=group)
            assert rel(p.grad, ref[n]) <= 1e-5, f"rank {rank}: grad of {n} differs"
    # DDP over the context group itself: it averages, so each rank's loss is scaled by world
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(tiny_model(**kw), process_group=group)
    (ddp(x[:, lo:hi], cp_group=group, return_sequence=True) * w[:, lo:hi]).sum().mul(world).backward()
    for n, p in ddp.module.named_parameters():
        assert rel(p.grad, ref[n]) <= 1e-5, f"rank {rank}: DDP + context parallel grad of {n} differs"
    # FSDP2 over the context group itself (its all-gathers and reduce-scatters interleave
    # with the context exchange on one group); its reduce-scatter averages too
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    sharded = tiny_model(**kw)
    mesh = DeviceMesh.from_group(group, "cpu")
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    (sharded(x[:, lo:hi], cp_group=group, return_sequence=True) * w[:, lo:hi]).sum().mul(world).backward()
    for n, p in sharded.named_parameters():
        assert rel(p.grad.full_tensor(), ref[n]) <= 1e-5, \
            f"rank {rank}: FSDP2 + context parallel grad of {n} differs"

    # bad use: every rank raises (none hangs), and the group still works afterwards
    q = torch.randn(1, 4, 2, 8)
    v = torch.randn(1, 4, 2, 8)
    H = 3 if rank == 1 else 2
    qh = torch.randn(1, 4, H, 8)
    expect_error(lambda: chunk_gla_cp(qh, qh, torch.randn(1, 4, H, 8), qh.clamp(max=0)),
                 "same B, H, K, V", "rank 1: B=1, H=3")
    qd = q.double() if rank == world - 1 else q
    expect_error(lambda: chunk_gla_cp(qd, qd, v.to(qd.dtype), qd.clamp(max=0)), "dtype=float64")
    qg = q.clone().requires_grad_(rank == 0)         # only rank 0 would run the backward
    expect_error(lambda: chunk_gla_cp(qg, q, v, q.clamp(max=0)), "requires_grad=1")
    h0 = torch.zeros(1, 2, 8, 8) if rank == 1 else None
    expect_error(lambda: chunk_gla_cp(q, q, v, q.clamp(max=0), initial_state=h0),
                 "rank 0 only" if rank == 1 else "rank(s) [1]")
    bad_v = torch.randn(1, 5, 2, 8) if rank == 0 else v
    expect_error(lambda: chunk_gla_cp(q, q, bad_v, q.clamp(max=0)),
                 "v must be" if rank == 0 else "rank(s) [0]")
    model = tiny_model()
    x = torch.randn(2, 3, 24)
    expect_error(lambda: model(x, cp_group=group), "return_sequence=True")
    lengths = torch.tensor([3, 2]) if rank == 0 else None
    expect_error(lambda: model(x, cp_group=group, return_sequence=True, lengths=lengths),
                 "lengths=" if rank == 0 else "rank(s) [0]")
    xb = torch.randn(3 if rank == 2 else 2, 3, 24)
    expect_error(lambda: model(xb, cp_group=group, return_sequence=True), "batch")
    # after all that, a good call still gives the right answer
    check_case(rank, world, _case(31, [10, 3, 0][:world] + [5] * (world - 3), gate=16))


def worker_3(rank, world):
    worker_ops(rank, world, OP_CASES[3])
    worker_model(rank, world, [9, 0, 14])


def test_chunk_gla_cp_model_and_bad_use_3_ranks():
    run_ranks(worker_3, 3)


# ---- DDP and FSDP2: 2-rank training steps == one process on the whole batch ----------------

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gla = tiny_model(embed_dim=12)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.gla(x))


def train(model, batches, params=None):
    opt = torch.optim.SGD(params or model.parameters(), lr=0.1, momentum=0.9)
    for x, target in batches:
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def worker_dp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4 * world, 10, 12, generator=gen),
                torch.randint(0, 5, (4 * world,), generator=gen)) for _ in range(3)]
    mine = [(x[4 * rank:4 * rank + 4], t[4 * rank:4 * rank + 4]) for x, t in batches]
    torch.manual_seed(0)
    single = Classifier()
    ddp_model, fsdp_model = Classifier(), Classifier()
    ddp_model.load_state_dict(single.state_dict())
    fsdp_model.load_state_dict(single.state_dict())
    train(single, batches)
    expected = dict(single.named_parameters())

    ddp = DDP(ddp_model)
    train(ddp, mine)
    for n, p in ddp.module.named_parameters():
        assert rel(p, expected[n]) <= 1e-5, f"DDP rank {rank}: {n} differs"

    mesh = init_device_mesh("cpu", (world,))
    for block in fsdp_model.gla.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)
    train(fsdp_model, mine)
    for n, p in fsdp_model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert rel(full, expected[n]) <= 1e-5, f"FSDP2 rank {rank}: {n} differs"


def worker_2(rank, world):
    worker_ops(rank, world, OP_CASES[2])
    worker_dp(rank, world)


def test_chunk_gla_cp_ddp_and_fsdp2_2_ranks():
    run_ranks(worker_2, 2)


# ---- the example: torchrun, 2 processes, data x context mesh ------------------------------

def test_train_distributed_example_runs():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "train_distributed.py"), "--steps", "30", "--cp", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "mesh data 1 x context 2" in text and "30/30" in text, text[-3000:]
