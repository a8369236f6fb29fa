"""The single-process engine: requests in, token chunks out, one schedule -> run -> sample step at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pdserve.workers.attention import make_attention_backend
from pdserve.workers.beam import BeamGroup, step_group
from pdserve.workers.block_manager import BlockManager
from pdserve.workers.config import EngineConfig
from pdserve.workers.detokenizer import decode_new_text, find_stop, init_offsets
from pdserve.workers.errors import InvalidRequestError
from pdserve.workers.model_runner import ModelRunner, kv_bytes_per_block
from pdserve.workers.models.loader import load_model, resolve_kv_dtype
from pdserve.workers.outputs import TokenChunk, Usage
from pdserve.workers.overlap import InFlight, TokenStaging, placeholder, plain
from pdserve.workers.parallel import ParallelGroup, fan_out
from pdserve.workers.prompt import PromptProcessor
from pdserve.workers.sampler import Logprobs, Sampler
from pdserve.workers.sampling_params import SamplingParams
from pdserve.workers.scheduler import Scheduler, SchedulerConfig
from pdserve.workers.sequence import FinishReason, Sequence, SequenceStatus
from pdserve.workers.spec_decode import SpecConfig, SpecDecoder

logger = logging.getLogger(__name__)

FINISHED = SequenceStatus.FINISHED

MAX_DEFAULT_CONTEXT = 8192


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


class LLMEngine:
    """Owns a model runner, a block manager and a scheduler; not thread-safe."""

    def __init__(self, config: EngineConfig, model_path: str | Path | None = None,
                 tokenizer: Any = None) -> None:
        if model_path is None:
            from pdserve.workers.model_store import resolve_model

            cache = Path(config.model_cache_dir) if config.model_cache_dir else None
            model_path = resolve_model(config.model, cache_dir=cache)
        self.model_path = Path(model_path)
        self.device = torch.device(config.device)
        if self.device.type == "cpu" and config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.model = load_model(self.model_path, config.dtype, self.device, config.quantization)
        self.model_config = self.model.config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.model_path)
        max_len = config.max_model_len or min(self.model_config.max_position_embeddings,
                                              MAX_DEFAULT_CONTEXT)
        kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, config.dtype)
        num_blocks = config.num_blocks or max(
            16, config.kv_cache_memory_mb * 2**20 // kv_bytes_per_block(self.model, config.block_size, kv_dtype))
        self.config = replace(config, max_model_len=max_len, num_blocks=num_blocks)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching, config.worker_id,
                                          eviction_policy=config.eviction_policy,
                                          cache_ttl_seconds=config.cache_ttl_seconds,
                                          tenant_quota_blocks=config.tenant_quota_blocks,
                                          session_ttl_seconds=config.session_ttl_seconds,
                                          keep_events=False)  # from a consumer's first take
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                            config.long_prefill_token_threshold, max_len),
            self.block_manager)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.device, kv_dtype,
                                  # only the reference path reads the int8 cache's scales
                                  make_attention_backend("torch" if kv_dtype == torch.int8
                                                         else config.attention_backend, self.device),
                                  max_model_len=max_len, cuda_graphs=config.cuda_graphs,
                                  max_num_seqs=config.max_num_seqs,
                                  shared_prefix_attention=config.shared_prefix_attention)
        self.sampler = Sampler(self.model_config.eos_token_ids, config.seed, self.device)
        self.prompts = PromptProcessor(self.tokenizer, self.vocab_size, max_len)
        self.requests: dict[str, Sequence] = {}
        self.spec = None
        if config.speculative_method is not None:
            if config.speculative_method not in ("ngram", "draft"):
                raise InvalidRequestError("config.speculative_method",
                                          f"{config.speculative_method!r} is not one of ('ngram', 'draft')")
            draft = None
            if config.speculative_method == "draft":
                if not config.speculative_draft_model:
                    raise InvalidRequestError("config.speculative_draft_model",
                                              "the draft method needs a draft model folder")
                from pdserve.workers.draft_model import DraftModelProposer

                draft = DraftModelProposer(config.speculative_draft_model, config.dtype,
                                           self.device, num_blocks, config.block_size,
                                           self.vocab_size)
            self.spec = SpecDecoder(SpecConfig(config.speculative_method,
                                               config.num_speculative_tokens,
                                               config.speculative_adaptive), max_len, draft)
        self._pending: list[TokenChunk] = []  # chunks produced outside step() (aborts)
        self.num_steps = 0
        # Overlapped scheduling (overlap.py): on by default where the device runs ahead.
        overlap = config.async_scheduling
        self.overlap = (self.device.type == "cuda" if overlap is None else overlap) and self.spec is None
        self._inflight: InFlight | None = None
        self._staging = TokenStaging(self.device)
        self.num_overlapped = 0  # steps launched while the previous step's tokens were in flight
        logger.info("engine ready: %d KV blocks of %d tokens, max_model_len %d",
                    num_blocks, config.block_size, max_len)

    # -- requests -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.model_config.eos_token_ids

    def encode_prompt(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                      messages: list[dict] | None = None) -> list[int]:
        return self.prompts.encode(prompt, prompt_token_ids, messages)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.prompts.apply_chat_template(messages)

    def add_request(self, request_id: str, prompt: str | None = None,
                    params: SamplingParams | None = None, *, prompt_token_ids: list[int] | None = None,
                    messages: list[dict] | None = None, priority: int = 0,
                    cache_salt: str | None = None, arrival: float | None = None,
                    prefill_only: bool = False, session_id: str | None = None) -> Sequence:
        """Validate and queue a request; raises InvalidRequestError naming the bad field."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params = params or SamplingParams()
        params.validate(self.vocab_size)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError("priority", "must be an integer")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InvalidRequestError("cache_salt", "must be a string")
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise InvalidRequestError("session_id", "must be a non-empty string")
        ids = self.encode_prompt(prompt, prompt_token_ids, messages)
        self.prompts.check_length(len(ids), params.max_tokens)
        if -(-(len(ids) + params.max_tokens) // self.config.block_size) > self.block_manager.num_blocks:
            raise InvalidRequestError("sampling_params.max_tokens",
                                      "the request needs more KV blocks than this worker has")
        seq = Sequence(request_id=request_id, token_ids=ids, num_prompt_tokens=len(ids),
                       params=params, arrival=arrival if arrival is not None else time.monotonic(),
                       priority=priority, cache_salt=cache_salt, prefill_only=prefill_only,
                       session_id=session_id)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        init_offsets(seq)
        if prefill_only and (params.use_beam_search or params.n > 1):
            if len(ids) < 2:
                raise InvalidRequestError("prompt", "a split beam/n>1 request needs 2+ tokens")
            # Compute KV for all but the last prompt token; the decode worker runs that one
            # and forks beams / samples over the blocks it received.
            seq.held_token = seq.token_ids.pop()
            seq.num_prompt_tokens -= 1
        else:
            self.attach_groups(seq)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        logger.debug("request %s queued: %d prompt tokens", request_id, len(ids))
        return seq

    def attach_groups(self, seq: Sequence) -> None:
        """Make ``seq`` the root of its beam group or parallel-sampling group, if any."""
        params = seq.params
        if params.use_beam_search:
            seq.seq_id = f"{seq.request_id}#0"
            seq.beam = BeamGroup(seq.request_id, params.beam_width, params.length_penalty,
                                 params.early_stopping, params.max_tokens,
                                 () if params.ignore_eos else self.eos_token_ids,
                                 seq.num_prompt_tokens, beams=[seq], scores=[0.0])
        elif params.n > 1:
            seq.parallel = ParallelGroup(params.n)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request at whatever stage it is; frees its blocks. False if unknown."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        group = seq.beam.beams if seq.beam is not None else (
            seq.parallel.seqs if seq.parallel is not None and seq.parallel.forked else [seq])
        for b in group:
            if b.token_ids and b.token_ids[-1] < 0:  # an in-flight token nobody will land
                b.token_ids.pop()
            self.scheduler.remove(b)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        self._pending.append(self._final_chunk(seq, (), "", ()))
        logger.debug("request %s aborted", request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending) or self._inflight is not None

    # -- the step -------------------------------------------------------------
    def step(self) -> list[TokenChunk]:
        self.housekeeping()
        chunks, self._pending = self._pending, []
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        if prev is not None and (sched.empty or sched.preempted):
            self._land(prev, chunks)  # nothing to overlap with, or a row left the batch
            prev = None
            sched.scheduled[:] = [s for s in sched.scheduled if not s.seq.is_finished]
        if sched.empty:
            return chunks
        now = time.monotonic()
        for s in sched.scheduled:
            if s.seq.first_scheduled is None:
                s.seq.first_scheduled = now
        batch, logits = self.runner.execute(sched, None if prev is None else prev.tokens,
                                            as_float=not self.overlap)
        # the logits' rows, in order (ScheduledSeq.samples, inlined: a per-row hot path)
        sampling = [s.seq for s in batch
                    if s.seq.num_computed_tokens + s.num_new_tokens == len(s.seq.token_ids)]
        ended = 0
        if prev is not None:  # step N+1 is on the device: now the host takes step N's tokens
            self.num_overlapped += 1
            ended = self._land(prev, chunks)
            if ended:  # rows that ended at step N: their extra row in step N+1 is dropped
                batch = [s for s in batch if not s.seq.is_finished]
        self.scheduler.finish_step(batch)
        self.num_steps += 1
        if not sampling:
            return chunks
        if self.overlap and all(plain(s) for s in sampling if s.status is not FINISHED):
            self._defer(sampling, logits, ended)
            return chunks
        logits = logits.float()
        if ended and any(s.is_finished for s in sampling):
            keep = [i for i, s in enumerate(sampling) if not s.is_finished]
            sampling, logits = [sampling[i] for i in keep], logits[keep]
            if not sampling:
                return chunks
        if any(s.drafts or s.held_token is not None or s.beam is not None or s.parallel is not None
               for s in sampling):  # one pass for the common batch of plain rows
            sampling, logits = self._special_rows(sampling, logits, chunks)
            if not sampling:
                return chunks
        result = self.sampler(logits, sampling)
        append = self._append_token
        for seq, tok, lp in zip(sampling, result.token_ids, result.logprobs, strict=True):
            chunk = append(seq, tok, lp)
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _defer(self, sampling: list[Sequence], logits: torch.Tensor, ended: int) -> None:
        """Tokens are sampled and stay on the device (a greedy argmax in the model's dtype
        is the same token); rows that may go on get a placeholder token. Nothing here
        copies from the device or from pageable host memory: that would wait for the GPU."""
        seqs: list[Sequence | None] = sampling
        if ended:
            seqs = [None if s.status is FINISHED else s for s in sampling]
        self._inflight = self._staging.launch(seqs, self.sampler.on_device(logits, sampling))
        max_len = self.config.max_model_len or 0
        for i, seq in enumerate(seqs):
            if seq is None:
                continue
            ids = seq.token_ids
            n = len(ids)
            # a row that ends by length with this token needs no next step
            if n + 1 - seq.num_prompt_tokens < seq.params.max_tokens and n + 1 < max_len:
                ids.append(placeholder(i))

    def _land(self, prev: InFlight, chunks: list[TokenChunk]) -> int:
        """Bring a deferred step's tokens to the host: placeholders become tokens, then the
        usual stop checks and text. Returns how many of its sequences ended."""
        accept, ended = self._accept_token, 0
        for seq, tok in zip(prev.seqs, prev.token_list(), strict=True):
            if seq is None or seq.status is FINISHED:  # dropped, or aborted while in flight
                continue
            ids = seq.token_ids
            if ids[-1] < 0:
                ids[-1] = tok
            else:
                ids.append(tok)
            chunk = accept(seq, tok, None)
            if chunk is not None:
                chunks.append(chunk)
                ended += chunk.finished or seq.status is FINISHED
        return ended

    def _special_rows(self, sampling: list[Sequence], logits: torch.Tensor,
                      chunks: list[TokenChunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Drafts, KV-only prefills, beams and n > 1 fan-out; the rows left to sample."""
        if any(s.drafts for s in sampling):
            sampling, logits = self._verify_drafts(sampling, logits, chunks)
        if any(s.held_token is not None for s in sampling):
            keep = [i for i, s in enumerate(sampling) if s.held_token is None]
            for s in sampling:
                if s.held_token is not None:  # KV-only prefill (split beam / n > 1) is done
                    self._on_prefill_done(s)
                    chunks.append(TokenChunk(s.request_id, (), ""))
            sampling, logits = [sampling[i] for i in keep], logits[keep]
            if not sampling:
                return sampling, logits
        if any(s.beam is not None for s in sampling):
            sampling, logits = self._collect_beams(sampling, logits, chunks)
            if not sampling:
                return sampling, logits
        if any(s.parallel is not None and not s.parallel.forked for s in sampling):
            sampling, logits = self._fan_out(sampling, logits)
        return sampling, logits

    def _verify_drafts(self, seqs: list[Sequence], logits: torch.Tensor,
                       chunks: list[TokenChunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Verify speculating sequences (k + 1 rows each), emit what they accepted, roll
        back the rest; return the other sequences with their single rows."""
        rest, rows, r = [], [], 0
        for seq in seqs:
            if not seq.drafts:
                rest.append(seq)
                rows.append(r)
                r += 1
                continue
            k = len(seq.drafts)
            emit = self.spec.settle(seq, logits[r:r + k + 1])
            r += k + 1
            base = seq.num_tokens
            for tok in emit:
                chunk = self._append_token(seq, tok, None)
                if chunk is not None:
                    chunks.append(chunk)
                if seq.is_finished:
                    break
            if not seq.is_finished:
                seq.num_computed_tokens = base + len(emit) - 1  # KV holds T + accepted drafts
                self.block_manager.truncate(seq)
                self.block_manager.commit(seq)
        return rest, logits[rows]

    def _fan_out(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        rows = list(range(len(seqs)))
        out = list(seqs)
        for i, s in enumerate(seqs):
            if s.parallel is not None and not s.parallel.forked:
                children = fan_out(s, self.block_manager)
                self.scheduler.running.extend(children)
                out.extend(children)
                rows.extend([i] * len(children))
        return out, logits[rows]

    # -- beam search --------------------------------------------------------------
    def _collect_beams(self, seqs: list[Sequence], logits: torch.Tensor,
                       chunks: list[TokenChunk]) -> tuple[list[Sequence], torch.Tensor]:
        """Hand beam rows to their groups (stepping groups whose beams are all in);
        return the other sequences and their logits."""
        keep = [i for i, s in enumerate(seqs) if s.beam is None]
        groups = {}
        for i, s in enumerate(seqs):
            if s.beam is not None:
                s.beam.pending[s.seq_id] = torch.log_softmax(logits[i].float(), dim=-1)
                groups[id(s.beam)] = s.beam
        for g in groups.values():
            if g.ready():
                chunk = step_group(g, self.scheduler, self.block_manager, self.tokenizer)
                if chunk is not None:  # the search ended
                    self.requests.pop(g.request_id, None)
                    chunks.append(chunk)
        return [seqs[i] for i in keep], logits[keep]

    def housekeeping(self) -> None:
        """Between steps: expire idle sessions and cached blocks (the P/D engine adds leases)."""
        self.block_manager.expire()

    def _append_token(self, seq: Sequence, token: int, lp: Logprobs | None) -> TokenChunk | None:
        seq.token_ids.append(token)
        return self._accept_token(seq, token, lp)

    def _accept_token(self, seq: Sequence, token: int, lp: Logprobs | None) -> TokenChunk | None:
        """``token`` is the last of ``seq.token_ids``: timing, text, stop checks, the chunk."""
        p = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        prev_len = len(seq.output_text)
        new = decode_new_text(self.tokenizer, seq, p.skip_special_tokens)
        if new:
            seq.output_text += new
        lps = (lp,) if lp is not None else ()
        # Stop checks, inline: they run once per running sequence and step
        n = len(seq.token_ids)
        n_out = n - seq.num_prompt_tokens
        reason: FinishReason | None = None
        stop_reason: str | int | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = FinishReason.STOP
            elif token in p.stop_token_ids:
                reason, stop_reason = FinishReason.STOP, token
            elif p.stop:
                hit = find_stop(seq.output_text, prev_len, p.stop)
                if hit is not None:
                    idx, s = hit
                    seq.output_text = seq.output_text[:idx + (len(s) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = FinishReason.STOP, s
        if reason is None and (n_out >= p.max_tokens or n >= (self.config.max_model_len or 0)):
            reason = FinishReason.LENGTH
        if reason is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            seq.stop_reason = stop_reason
            self.scheduler.remove(seq)
            text = seq.output_text[seq.emitted_text_len:]
            seq.emitted_text_len = len(seq.output_text)
            g = seq.parallel
            if g is not None and g.forked:
                g.remaining -= 1
                g.completion_tokens += seq.num_output_tokens
                if g.remaining:  # this sample ended; its siblings go on
                    return TokenChunk(seq.request_id, (token,), text, finish_reason=reason.value,
                                      stop_reason=stop_reason, logprobs=lps, index=seq.index)
            self.requests.pop(seq.request_id, None)
            return self._final_chunk(seq, (token,), text, lps)
        if p.stop:  # hold back what may be the start of a stop string
            hold = max(len(s) for s in p.stop) - 1
            safe = max(seq.emitted_text_len, len(seq.output_text) - hold)
        else:
            safe = max(seq.emitted_text_len, len(seq.output_text))
        text = seq.output_text[seq.emitted_text_len:safe]
        seq.emitted_text_len = safe
        if seq.prefill_only:
            self._on_prefill_done(seq)
        return TokenChunk(seq.request_id, (token,), text, logprobs=lps, index=seq.index)

    def _on_prefill_done(self, seq: Sequence) -> None:
        """A prefill-only sequence sampled its first token: the P/D engine leases its blocks."""
        raise NotImplementedError("prefill_only requests need the disaggregated engine")

    def _final_chunk(self, seq: Sequence, tokens: tuple[int, ...], text: str,
                     lps: tuple[Logprobs, ...]) -> TokenChunk:
        assert seq.finish_reason is not None
        return TokenChunk(seq.request_id, tokens, text, finished=True,
                          finish_reason=seq.finish_reason.value, stop_reason=seq.stop_reason,
                          logprobs=lps, usage=self.usage(seq), index=seq.index)

    @staticmethod
    def usage(seq: Sequence) -> Usage:
        g = seq.parallel
        done = g.completion_tokens if g is not None and g.forked else seq.num_output_tokens
        return Usage(seq.num_prompt_tokens, done, seq.num_cached_tokens)

    # -- introspection ----------------------------------------------------------
    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
        for seq in self.scheduler.running:
            assert seq.request_id in self.requests or seq.prefill_only, seq.request_id
