"""The Triton attention kernels (workers/kernels) against the torch reference path.

On a CUDA GPU at full size; test_kernels_interp.py runs this file again on CPU under the
Triton interpreter (TRITON_INTERPRET=1) with tiny shapes.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def size(gpu: int, interpreted: int) -> int:
    return interpreted if INTERPRET else gpu


def skip_interpreted_bf16(dtype: torch.dtype) -> None:
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter emulates bfloat16 inexactly (tl.dot, casts)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_cache(num_blocks: int, block_size: int, hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, num_blocks, block_size, hkv, d, dtype=dtype, device=DEVICE)


def random_tables(lens: list[int], block_size: int, num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Each sequence gets distinct random blocks, in no order; rows padded with 0."""
    need = [-(-n // block_size) for n in lens]
    ids = rng.sample(range(num_blocks), sum(need))
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    at = 0
    for i, k in enumerate(need):
        tables[i, :k] = torch.tensor(ids[at:at + k])
        at += k
    return tables.to(DEVICE)


def decode_meta(lens: list[int], tables: torch.Tensor, block_size: int):
    from pdserve.workers.attention import AttentionMetadata

    slots = torch.stack([tables[i, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for i, n in enumerate(lens)])
    return AttentionMetadata(slot_mapping=slots, query_start_loc=list(range(len(lens) + 1)),
                             seq_lens=list(lens), num_prefills=0, block_tables=tables,
                             block_size=block_size,
                             seq_lens_tensor=torch.tensor(lens, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_kernel_matches_reference(dtype, group, head_dim):
    from pdserve.workers.attention import TorchAttention
    from pdserve.workers.kernels.paged_attention import decode_attention

    skip_interpreted_bf16(dtype)
    rng = random.Random(f"decode-{dtype}-{group}-{head_dim}")  # not hash(): salted per process
    torch.manual_seed(rng.randrange(1 << 30))
    for trial in range(size(4, 2)):
        block_size = rng.choice([16, 32])
        hkv = rng.choice([1, 2, 4])
        h = hkv * group
        bsz = rng.randint(1, size(9, 3))
        # Edge lengths (1, a block, a block + 1) and long random ones.
        lens = [rng.choice([1, block_size, block_size + 1, rng.randint(2, size(1500, 400))])
                for _ in range(bsz)]
        num_blocks = sum(-(-n // block_size) for n in lens) + rng.randint(0, 20)
        cache = make_cache(num_blocks, block_size, hkv, head_dim, dtype)
        tables = random_tables(lens, block_size, num_blocks, rng)
        q = torch.randn(bsz, h, head_dim, dtype=dtype, device=DEVICE)
        scale = head_dim ** -0.5
        # Reference in float32 over the same (rounded) inputs, through the torch backend.
        meta = decode_meta(lens, tables, block_size)
        k_new = cache[0].view(-1, hkv, head_dim)[meta.slot_mapping]
        v_new = cache[1].view(-1, hkv, head_dim)[meta.slot_mapping]
        ref = TorchAttention().forward(q.float(), k_new.float(), v_new.float(), cache.float(),
                                       meta, scale)
        for splits in (1, 4, 16)[:size(3, 2)]:
            out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
            decode_attention(q, cache, tables, meta.seq_lens_tensor, scale, splits, out=out)
            assert not out.isnan().any(), (trial, splits)
            err = rel_err(out, ref)
            assert err < TOL[dtype], (trial, splits, lens, err)


def shared_tables(groups: list[tuple[int, int]], lens: list[int], block_size: int,
                  num_blocks: int, rng: random.Random) -> torch.Tensor:
    """Rows in groups (rows, shared blocks): a group's rows begin with the same blocks, then
    each has its own; ``lens`` per row. Rows padded with 0."""
    need = [-(-n // block_size) for n in lens]
    ids = iter(rng.sample(range(num_blocks), num_blocks))
    tables = torch.zeros(len(lens), max(need), dtype=torch.int64)
    i = 0
    for rows, k in groups:
        common = [next(ids) for _ in range(k)]
        for _ in range(rows):
            tables[i, :need[i]] = torch.tensor(common + [next(ids) for _ in range(need[i] - k)])
            i += 1
    return tables.to(DEVICE)


@pytest.mark.parametrize(("dtype", "group", "head_dim"),
                         [(torch.bfloat16, 7, 64), (torch.float16, 4, 128), (torch.float32, 1, 64),
                          (torch.float32, 2, 128), (torch.bfloat16, 16, 128)])
def test_shared_prefix_decode_matches_reference(dtype, group, head_dim):
    """Rows in groups sharing leading blocks (of random length), with singletons and rows
    whose tail is one token: the shared-prefix plan and kernels give the reference output,
    for any split counts."""
    from pdserve.workers.attention import TorchAttention
    from pdserve.workers.kernels.paged_attention import decode_attention
    from pdserve.workers.kernels.shared_prefix import (
        MAX_SPLITS,
        SharedPrefix,
        flat_plan,
        plan_shared_prefix,
        rows_per_chunk,
    )

    skip_interpreted_bf16(dtype)
    rng = random.Random(f"shared-{dtype}-{group}-{head_dim}")
    torch.manual_seed(rng.randrange(1 << 30))
    for trial in range(size(3, 2)):
        bs = rng.choice([16, 32])
        hkv = rng.choice([1, 2])
        groups = [(rng.randint(1, size(40, 5)), rng.randint(1, size(40, 4))) for _ in range(rng.randint(1, 4))]
        lens = [k * bs + rng.choice([1, rng.randint(1, size(300, 40))]) for rows, k in groups
                for _ in range(rows)]
        num_blocks = sum(k for _, k in groups) + sum(-(-n // bs) for n in lens) + 4
        cache = make_cache(num_blocks, bs, hkv, head_dim, dtype)
        tables = shared_tables(groups, lens, bs, num_blocks, rng)
        rows = rows_per_chunk(group, head_dim)
        plan = plan_shared_prefix(tables.cpu().numpy(), (torch.tensor(lens) - 1).numpy() // bs, bs,
                                  rows, min_saved=0, min_fraction=0)
        if plan is None:
            assert all(r == 1 for r, _ in groups)
            continue
        sharing = [k * bs for r, k in groups for _ in range(r)]
        assert all(int(p) in (0, k) for p, k in zip(plan[0], sharing, strict=True))
        q = torch.randn(len(lens), hkv * group, head_dim, dtype=dtype, device=DEVICE)
        meta = decode_meta(lens, tables, bs)
        k_new = cache[0].view(-1, hkv, head_dim)[meta.slot_mapping]
        v_new = cache[1].view(-1, hkv, head_dim)[meta.slot_mapping]
        ref = TorchAttention().forward(q.float(), k_new.float(), v_new.float(), cache.float(),
                                       meta, head_dim ** -0.5)
        chunks = len(plan[2]) + rng.randint(0, 2)  # unused chunks: their programs do nothing
        for own, splits in ((1, 1), (2, 5), (4, MAX_SPLITS))[:size(3, 2)]:
            flat = np.empty(SharedPrefix.size(len(lens), chunks, rows), dtype=np.int64)
            flat_plan((*plan[:3], splits), len(lens), chunks, flat)
            sp = SharedPrefix.view(torch.from_numpy(flat).to(DEVICE), len(lens), chunks, rows,
                                    chunks * splits + rng.randint(0, 3))
            out = torch.full_like(q, float("nan"))
            decode_attention(q, cache, tables, meta.seq_lens_tensor, head_dim ** -0.5, own,
                             out=out, shared=sp)
            assert not out.isnan().any(), (trial, own, splits)
            err = rel_err(out, ref)
            assert err < TOL[dtype], (trial, own, splits, groups, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_matches_index_copy(dtype):
    from pdserve.workers.attention import write_kv as ref_write
    from pdserve.workers.kernels.paged_attention import write_kv

    skip_interpreted_bf16(dtype)
    cache = make_cache(40, 16, 2, 64, dtype)
    ref = cache.clone()
    slots = torch.randperm(40 * 16, device=DEVICE)[:300]
    k = torch.randn(300, 2, 64, device=DEVICE)  # float32 in, cache dtype out (cast inside)
    v = torch.randn(300, 2, 64, device=DEVICE)
    write_kv(k, v, cache, slots)
    ref_write(k, v, ref, slots)
    assert torch.equal(cache, ref)


class Step:
    """One step's inputs: sequences given as (tokens already cached, new tokens), multi-token
    rows first, each in distinct random blocks of a random cache."""

    def __init__(self, rows: list[tuple[int, int]], num_prefills: int, block_size: int, hkv: int,
                 group: int, head_dim: int, dtype: torch.dtype, rng: random.Random) -> None:
        self.lens = [c + n for c, n in rows]
        self.num_prefills, self.block_size = num_prefills, block_size
        num_blocks = sum(-(-n // block_size) for n in self.lens) + rng.randint(0, 8)
        self.cache = make_cache(num_blocks, block_size, hkv, head_dim, dtype)
        self.tables = random_tables(self.lens, block_size, num_blocks, rng)
        self.qsl, slots = [0], []
        for i, (c, n) in enumerate(rows):
            self.qsl.append(self.qsl[-1] + n)
            pos = torch.arange(c, c + n, device=DEVICE)
            slots.append(self.tables[i, pos // block_size] * block_size + pos % block_size)
        self.slots = torch.cat(slots)
        t = self.qsl[-1]
        self.q = torch.randn(t, hkv * group, head_dim, dtype=dtype, device=DEVICE)
        self.k = torch.randn(t, hkv, head_dim, dtype=dtype, device=DEVICE)
        self.v = torch.randn(t, hkv, head_dim, dtype=dtype, device=DEVICE)

    def meta(self):
        from pdserve.workers.attention import AttentionMetadata

        return AttentionMetadata(slot_mapping=self.slots, query_start_loc=self.qsl,
                                 seq_lens=self.lens, num_prefills=self.num_prefills,
                                 block_tables=self.tables, block_size=self.block_size,
                                 seq_lens_tensor=torch.tensor(self.lens, device=DEVICE))

    def reference(self) -> torch.Tensor:
        """The torch backend in float32 over the same (rounded) inputs."""
        from pdserve.workers.attention import TorchAttention

        d = self.q.shape[-1]
        return TorchAttention().forward(self.q.float(), self.k.float(), self.v.float(),
                                        self.cache.float(), self.meta(), d ** -0.5)


def random_prefill_rows(rng: random.Random, block_size: int, n: int) -> list[tuple[int, int]]:
    """Cached prefixes: none, part of a block, whole blocks, blocks and a part, long; new
    tokens: verification-sized (2..5), a chunk, a long prompt, sometimes a single token."""
    bs = block_size
    rows = []
    for _ in range(n):
        cached = rng.choice([0, rng.randint(1, bs - 1), bs * rng.randint(1, 4),
                             bs * rng.randint(1, 4) + rng.randint(1, bs - 1),
                             rng.randint(0, size(2000, 300))])
        new = rng.choice([1, rng.randint(2, 5), rng.randint(2, size(300, 40)),
                          rng.randint(2, size(700, 150))])
        rows.append((cached, new))
    return rows


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Every dtype x GQA group at the usual head sizes; padded (96) and other head sizes once each.
PREFILL_CASES = ([(dt, g, d) for dt in DTYPES for g in (1, 2, 5, 8) for d in (64, 128)]
                 + [(torch.bfloat16, 4, d) for d in (32, 96, 256)]
                 + [(torch.float16, 3, 96), (torch.float32, 2, 256)])


@pytest.mark.parametrize(("dtype", "group", "head_dim"), PREFILL_CASES)
def test_prefill_kernel_matches_reference(dtype, group, head_dim):
    from pdserve.workers.attention import write_kv
    from pdserve.workers.kernels.prefill_attention import plan_prefill, prefill_attention

    skip_interpreted_bf16(dtype)
    rng = random.Random(f"prefill-{dtype}-{group}-{head_dim}")
    torch.manual_seed(rng.randrange(1 << 30))
    bs = rng.choice([8, 16, 32])  # one per case: each block size is another kernel to compile
    for trial in range(size(3, 2)):
        hkv = rng.choice([1, 2, 4][:size(3, 2)])
        rows = random_prefill_rows(rng, bs, rng.randint(1, size(8, 3)))
        st = Step(rows, len(rows), bs, hkv, group, head_dim, dtype, rng)
        ref = st.reference()
        meta = st.meta()
        write_kv(st.k, st.v, st.cache, meta.slot_mapping)  # the kernel reads the new KV there
        plan = plan_prefill(meta.query_start_loc, meta.seq_lens, len(rows), group, head_dim,
                            dtype, st.q.device)
        out = torch.full_like(st.q, float("nan"))  # poisoned: every row must be written
        prefill_attention(st.q, st.cache, st.tables, plan, head_dim ** -0.5, out)
        assert not out.isnan().any(), (trial, rows)
        err = rel_err(out, ref)
        assert err < TOL[dtype], (trial, bs, rows, err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(size(4, 2)))
def test_triton_backend_mixed_batch_matches_torch(dtype, seed):
    """Prompts, chunks after cached KV, verification rows and decode rows in one step: the
    cache after the KV write is identical, the attention output within tolerance."""
    from pdserve.workers.attention import TorchAttention
    from pdserve.workers.kernels.attention import TritonAttention

    skip_interpreted_bf16(dtype)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    bs, hkv, group, d = 16, 2, 4, rng.choice([64, 128])
    rows = random_prefill_rows(rng, bs, rng.randint(1, size(6, 2)))
    rows = [(c, max(n, 2)) for c, n in rows]
    decodes = [(rng.randint(0, size(800, 50)), 1) for _ in range(rng.randint(0, size(8, 2)))]
    st = Step(rows + decodes, len(rows), bs, hkv, group, d, dtype, rng)
    ref_cache, our_cache = st.cache.clone(), st.cache.clone()
    ref = TorchAttention().forward(st.q, st.k, st.v, ref_cache, st.meta(), d ** -0.5)
    out = TritonAttention(torch.device(DEVICE)).forward(st.q, st.k, st.v, our_cache, st.meta(),
                                                        d ** -0.5)
    assert torch.equal(ref_cache, our_cache)
    assert rel_err(out, st.reference()) < TOL[dtype]
    assert rel_err(out, ref) < 2 * TOL[dtype]
