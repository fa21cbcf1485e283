"""The chunked forward launcher's fused / split choice (csrc/cuda/chunk_fwd.cu's want_split),
compiled on the CPU through tests/cuda_emu/fwd_policy_emu.cpp: want_split reads only the
sizes, so the shapes the issue's targets name (T = 16384) are checked without running a kernel.

float32: split when the fused grid fills under 0.8 of the SMs' block slots over its waves
(1 fused float32 block per SM at K = 128, 2 at K <= 64 on H100 / H200) and sequences span two
chunks or more; 16-bit: split under two fused blocks per SM. docs/cuda_float32.md has the
modelled times the float32 threshold comes from.
"""
import os
import subprocess

import pytest

from test_cuda_chunk_emu import _build

H100_SMS = 132


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    exe = _build(tmp_path_factory, "fwd_policy_emu")

    def run(env=None, **shape):
        args = [f"{k}={v}" for k, v in shape.items()]
        environ = {k: v for k, v in os.environ.items() if k != "GLA_EXT_CHUNK_FWD"}
        environ.update(env or {})
        out = subprocess.run([exe, *args], capture_output=True, text=True, env=environ)
        assert out.returncode == 0, out.stderr
        split, fill = out.stdout.split()
        return int(split.split("=")[1]), float(fill.split("=")[1])

    return run


# fused float32 grid: B * H * ceil(V / 64) blocks
@pytest.mark.parametrize("B,T,H,K,V,blocks,split,fill", [
    (4, 2048, 16, 128, 128, 1, 0, 128 / 132),   # one wave nearly full: fused (modelled faster)
    (2, 16384, 16, 128, 128, 1, 1, 64 / 132),   # half the SMs idle: split
    (1, 8192, 96, 128, 128, 1, 1, 192 / 264),   # the second wave under half full: split
    (2, 2048, 66, 128, 128, 1, 0, 1.0),         # two full waves: fused
    (1, 2048, 133, 128, 64, 1, 1, 133 / 264),   # one block over a wave: split
    (4, 2048, 16, 64, 64, 2, 1, 64 / 264),      # K = 64 holds two blocks per SM: 64 of 264 slots
    (16, 2048, 16, 64, 64, 2, 0, 256 / 264),
    (8, 2048, 16, 64, 64, 1, 0, 128 / 132),     # one block per SM at K = 64 (sm_80's smem)
])
def test_float32_rule_follows_the_wave_fill(policy, B, T, H, K, V, blocks, split, fill):
    got_split, got_fill = policy(dtype="f32", B=B, T=T, H=H, K=K, V=V, sms=H100_SMS, blocks=blocks)
    assert got_fill == pytest.approx(fill, abs=1e-4)
    assert got_split == split


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_one_chunk_per_sequence_stays_fused(policy, dtype):
    # a single sequence x head leaves 131 SMs idle, but one chunk has nothing to split
    assert policy(dtype=dtype, B=1, T=64, H=1, K=128, V=128)[0] == 0
    assert policy(dtype=dtype, B=1, T=65, H=1, K=128, V=128)[0] == 1
    # varlen: 4 sequences over 140 tokens average under two chunks each
    assert policy(dtype=dtype, B=1, T=140, H=1, K=128, V=128, nseq=4)[0] == 0
    assert policy(dtype=dtype, B=1, T=600, H=1, K=128, V=128, nseq=4)[0] == 1


@pytest.mark.parametrize("B,split", [(4, 1), (8, 1), (9, 0), (16, 0)])
def test_16bit_rule_is_two_blocks_per_sm(policy, B, split):
    # fused 16-bit grid: B * 16 heads * 2 V tiles = 128 / 256 / 288 / 512 blocks vs 2 x 132
    assert policy(dtype="bf16", B=B, T=2048, H=16, K=128, V=128, sms=H100_SMS)[0] == split


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_environment_forces_either_path(policy, dtype):
    shape = dict(dtype=dtype, B=4, T=2048, H=16, K=128, V=128)
    assert policy(env={"GLA_EXT_CHUNK_FWD": "split"}, **shape)[0] == 1
    assert policy(env={"GLA_EXT_CHUNK_FWD": "fused"}, B=2, T=16384, H=16, K=128, V=128,
                  dtype=dtype)[0] == 0
    assert policy(env={"GLA_EXT_CHUNK_FWD": "auto"}, **shape)[0] == (1 if dtype == "bf16" else 0)
    assert policy(env={"GLA_EXT_CHUNK_FWD": "sideways"}, **shape)[0] == -1
    # split needs tokens
    assert policy(env={"GLA_EXT_CHUNK_FWD": "split"}, dtype=dtype, B=1, T=0, H=1, K=64,
                  V=64)[0] == 0
