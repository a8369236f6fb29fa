"""Memory saved and quality lost by quantization: int8 / int4 weights and the int8 KV cache.

On the embedded SmolLM2 (CPU), for each variant: perplexity of a fixed public-domain text
(the opening of *Alice's Adventures in Wonderland*, first 600 tokens, one causal prefill
through the paged cache), agreement of greedy tokens with the unquantized model (identical
tokens at the same position, 32 generated per prompt; one near-tie flips the rest), agreement
of the next-token argmax along the text (teacher-forced, so no such cascade), weight bytes, KV
bytes per token and generation speed. Prints one JSON object.

    python scripts/bench_quant.py
    python scripts/bench_quant.py --variants fp32,int4 --text-tokens 300
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

# Lewis Carroll, Alice's Adventures in Wonderland (1865), chapter I; public domain.
ALICE = """Alice was beginning to get very tired of sitting by her sister on the bank, and of
having nothing to do: once or twice she had peeped into the book her sister was reading, but it
had no pictures or conversations in it, "and what is the use of a book," thought Alice "without
pictures or conversations?"

So she was considering in her own mind (as well as she could, for the hot day made her feel
very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the trouble
of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close by
her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the way
to hear the Rabbit say to itself, "Oh dear! Oh dear! I shall be late!" (when she thought it over
afterwards, it occurred to her that she ought to have wondered at this, but at the time it all
seemed quite natural); but when the Rabbit actually took a watch out of its waistcoat-pocket, and
looked at it, and then hurried on, Alice started to her feet, for it flashed across her mind that
she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it,
and burning with curiosity, she ran across the field after it, and fortunately was just in time
to see it pop down a large rabbit-hole under the hedge.

In another moment down went Alice after it, never once considering how in the world she was to
get out again.

The rabbit-hole went straight on like a tunnel for some way, and then dipped suddenly down, so
suddenly that Alice had not a moment to think about stopping herself before she found herself
falling down a very deep well.

Either the well was very deep, or she fell very slowly, for she had plenty of time as she went
down to look about her and to wonder what was going to happen next. First, she tried to look
down and make out what she was coming to, but it was too dark to see anything; then she looked
at the sides of the well, and noticed that they were filled with cupboards and book-shelves;
here and there she saw maps and pictures hung upon pegs. She took down a jar from one of the
shelves as she passed; it was labelled "ORANGE MARMALADE", but to her great disappointment it
was empty: she did not like to drop the jar for fear of killing somebody underneath, so managed
to put it into one of the cupboards as she fell past it.

"Well!" thought Alice to herself, "after such a fall as this, I shall think nothing of tumbling
down stairs! How brave they'll all think me at home! Why, I wouldn't say anything about it, even
if I fell off the top of the house!" (Which was very likely true.)

Down, down, down. Would the fall never come to an end? "I wonder how many miles I've fallen by
this time?" she said aloud. "I must be getting somewhere near the centre of the earth. Let me
see: that would be four thousand miles down, I think--" (for, you see, Alice had learnt several
things of this sort in her lessons in the schoolroom, and though this was not a very good
opportunity for showing off her knowledge, as there was no one to listen to her, still it was
good practice to say it over) "--yes, that's about the right distance--but then I wonder what
Latitude or Longitude I've got to?" (Alice had no idea what Latitude was, or Longitude either,
but thought they were nice grand words to say.)
"""

PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it famous for?",
    "Give three tips for learning a new programming language.",
    "Describe how a bicycle works.",
    "What should I cook for dinner tonight?",
)

# name -> EngineConfig fields
VARIANTS = {
    "fp32": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},
    "kv_int8": {"kv_cache_dtype": "int8"},
    "int8+kv_int8": {"quantization": "int8", "kv_cache_dtype": "int8"},
}


def projection_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder's q/k/v/o and gate/up/down projections (the quantized part)."""
    from pdserve.workers.quant import ATTN_PROJ, MLP_PROJ, weight_bytes

    return sum(weight_bytes(getattr(parent, name))
               for layer in model.model.layers
               for parent, names in ((layer.self_attn, ATTN_PROJ), (layer.mlp, MLP_PROJ))
               for name in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="local HF folder (default: embedded SmolLM2)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--text-tokens", type=int, default=600)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pdserve.workers.config import EngineConfig
    from pdserve.workers.engine import LLMEngine, load_tokenizer
    from pdserve.workers.model_runner import kv_bytes_per_block
    from pdserve.workers.model_store import resolve_model
    from pdserve.workers.quant import perplexity, prefill_logits, weight_bytes
    from pdserve.workers.sampling_params import SamplingParams

    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    text_ids = tok(ALICE)["input_ids"][:args.text_tokens]
    names = args.variants.split(",")
    if names[0] != "fp32":
        names.insert(0, "fp32")  # the reference for agreement
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    result: dict = {"bench": "quant", "model": path.name, "text_tokens": len(text_ids),
                    "gen_tokens": args.gen_tokens, "prompts": len(PROMPTS),
                    "threads": torch.get_num_threads(), "host": platform.node(), "variants": {}}
    ref: list[list[int]] = []
    ref_top1 = torch.empty(0)
    for name in names:
        eng = LLMEngine(EngineConfig(num_blocks=256, max_num_seqs=len(PROMPTS), **VARIANTS[name]),
                        model_path=path, tokenizer=tok)
        t = time.perf_counter()
        logits = prefill_logits(eng.model, text_ids, eng.runner.kv_dtype)
        ppl_s = time.perf_counter() - t
        top1 = logits.argmax(dim=-1)
        if name == "fp32":
            ref_top1 = top1
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"{name}-{i}", messages=[{"role": "user", "content": p}], params=sp)
        out: dict[str, list[int]] = {}
        steps, t = 0, time.perf_counter()
        while eng.has_unfinished():
            for c in eng.step():
                out.setdefault(c.request_id, []).extend(c.token_ids)
            steps += 1
        gen_s = time.perf_counter() - t
        toks = [out[f"{name}-{i}"] for i in range(len(PROMPTS))]
        if name == "fp32":
            ref = toks
        same = [sum(a == b for a, b in zip(x, y, strict=True)) / len(x) for x, y in zip(toks, ref, strict=True)]
        prefix = [next((j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x))
                  for x, y in zip(toks, ref, strict=True)]
        result["variants"][name] = {
            **VARIANTS[name],
            "perplexity": round(perplexity(logits, text_ids), 3),
            "text_top1_agreement": round(float((top1 == ref_top1).float().mean()), 4),
            "weight_bytes": weight_bytes(eng.model),
            "projection_bytes": projection_bytes(eng.model),
            "kv_bytes_per_token": kv_bytes_per_block(eng.model, 1, eng.runner.kv_dtype),
            "greedy_agreement": round(sum(same) / len(same), 3),
            "greedy_common_prefix": round(sum(prefix) / len(prefix), 1),
            "perplexity_s": round(ppl_s, 2),
            "generate_tok_s": round(len(PROMPTS) * args.gen_tokens / gen_s, 1),
        }
        del eng
    base = result["variants"]["fp32"]
    for v in result["variants"].values():
        v["perplexity_delta_pct"] = round(100 * (v["perplexity"] / base["perplexity"] - 1), 2)
        v["weight_ratio"] = round(v["weight_bytes"] / base["weight_bytes"], 3)
        v["kv_ratio"] = round(v["kv_bytes_per_token"] / base["kv_bytes_per_token"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
