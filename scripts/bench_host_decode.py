"""Host time of a 256-row decode step, on the CPU, through the engine's real path: scheduler,
graph input staging (DecodeGraphs._fill), landing, detokenization, stop checks. Only the
GPU work is faked (the graph replay returns zeros). Prints the median step in ms, and the
median of the steps where every row starts a new KV block (every 16th: a block to allocate
and one to register per row) apart from the others.

    python scripts/bench_host_decode.py real            # the SmolLM2 tokenizer (DecodeStream)
    python scripts/bench_host_decode.py real --offsets  # the same, detokenized by offsets
    python scripts/bench_host_decode.py stub            # the GPU benches' stub tokenizer
    python scripts/bench_host_decode.py real --profile  # and a cProfile of 50 steps
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time
from pathlib import Path

import torch
from bench_gpu import StubTokenizer  # scripts/ is on the path when run as a script
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pdserve.workers.config import EngineConfig
from pdserve.workers.decode_graphs import DecodeGraphs, buckets
from pdserve.workers.engine import LLMEngine
from pdserve.workers.sampling_params import SamplingParams


class _NoOp:
    def synchronize(self) -> None: ...
    def record(self) -> None: ...
    def replay(self) -> None: ...


class HostGraphs(DecodeGraphs):
    """DecodeGraphs' input staging on CPU tensors; replays do nothing."""

    def __init__(self, max_batch: int, block_size: int, width: int, hidden: int) -> None:
        self.block_size, self.width = block_size, width
        self.planner, self.rows, self.shared_replays = None, 1, 0  # no shared-prefix plans
        self.sizes = sorted(set(buckets(max_batch)))
        self.max_batch = self.sizes[-1]
        self.buf = torch.zeros(self._size(self.max_batch), dtype=torch.int64)
        self.pinned = torch.empty_like(self.buf)
        self.copied, self._staged = _NoOp(), None
        out = torch.zeros(self.max_batch, hidden)
        self.graphs = {b: (_NoOp(), out) for b in self.sizes}
        self.shared_graphs = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tokenizer", choices=["stub", "real"])
    ap.add_argument("--offsets", action="store_true", help="detokenize by offsets (no DecodeStream)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-boundary", action="store_true",
                    help="a cProfile of 8 block-boundary steps only")
    args = ap.parse_args()
    if args.offsets:
        import pdserve.workers.detokenizer as detok
        detok._open_stream = lambda *a: False
    folder = Path(tempfile.mkdtemp())
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=4096, eos_token_id=2, bos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    if args.tokenizer == "stub":
        tok = StubTokenizer()
    else:
        from pdserve.workers.model_store import ensure_embedded_model
        tok = AutoTokenizer.from_pretrained(ensure_embedded_model(progress=False))
    eng = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32", max_num_seqs=256,
                                 max_num_batched_tokens=16384, num_blocks=20000, max_model_len=1024,
                                 async_scheduling=True, enable_prefix_caching=True),
                    model_path=folder, tokenizer=tok)
    eng.runner.graphs = HostGraphs(256, 16, 64, 32)
    rng = random.Random(0)

    def add(tag: str) -> None:
        for i in range(256):  # ids 300..499: whole-word pieces, so prompts end on a character
            eng.add_request(f"{tag}{i}-{time.monotonic_ns()}",
                            prompt_token_ids=[rng.randrange(300, 500) for _ in range(512)],
                            params=SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))

    prof = cProfile.Profile() if args.profile_boundary else None
    for rnd in range(2):  # the first run warms up
        add("r")
        steps, boundary = [], []
        while eng.has_unfinished():
            # this step starts a block for every row (all prompts are 512 tokens)
            first = next(iter(eng.scheduler.running), None)
            at = first is not None and first.num_computed_tokens % 16 == 0 and first.num_output_tokens
            on = prof is not None and rnd == 1 and at and len(boundary) < 8
            if on:
                prof.enable()
            t = time.perf_counter()
            eng.step()
            (boundary if at else steps).append(time.perf_counter() - t)
            if on:
                prof.disable()
    mid = sorted(steps[20:100])
    edge = sorted(boundary[1:])
    print(f"median decode step ms: {mid[len(mid) // 2] * 1e3:.3f}; at a block boundary: "
          f"{edge[len(edge) // 2] * 1e3:.3f} ({len(edge)} steps)")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.profile:
        add("p")
        for _ in range(30):
            eng.step()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            eng.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
