"""Greedy generation speed, side by side in one process: memboost (each
format, exact and act_bits=8) through its decode loop (memboost.runtime),
transformers' eager generate in float32, and llama.cpp (llama-cpp-python) on
memboost's own GGUF export (memboost.export_gguf of the float model) at the
nearest GGUF type. Every row carries its ratio to llama.cpp at that type.

Models: SmolLM2-135M (memboost.testbed, float32) and Llama-3.2-1B- and
3B-shaped models (`llama1b`, `llama3b`) with random bf16 weights built from a
LlamaConfig (nothing downloaded; memboost computes in bf16 on them,
transformers' row in float32).

Batch 1: `--tokens` greedy tokens after a short prompt, tokens/s = tokens /
wall time of the whole call (prefill included), best of `--repeats` after a
warm-up. Batch 8/16 (`--batches`): that many prompts of different lengths
decoded together by memboost.runtime (left-padded), tokens/s = batch * tokens
/ time; llama.cpp decodes the same prompts together (one sequence id each,
one llama_decode per step, through llama-cpp-python's low-level API).

    python benchmarks/bench_generate.py                       # everything (long: the 1B model)
    python benchmarks/bench_generate.py --tokens 4 --models smollm2 --formats mixed   # a quick check

The memboost rows quantize the output layer to int8 (quantize_model's
default, llama.cpp's Q8_0 layout; the `lm_head` column); `--lm-heads
int8,float` adds the rows with the float32 output layer.
"""

import argparse
import copy
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

import memboost  # noqa: E402
from memboost.runtime import Decoder  # noqa: E402

# format -> (quantize_model arguments, nearest GGUF type)
FORMATS = {
    "mixed": (dict(method="mixed", ratio_4bit=0.5), "Q4_0"),      # ~3.5 bits
    "nf4": (dict(method="nf4"), "IQ4_NL"),                         # the same 4-bit non-linear grid idea
    "ternary": (dict(method="ternary"), "TQ2_0"),
    "lort": (dict(method="lort", rank=64, iters=3), "TQ2_0"),       # ternary + low rank
}
FLOAT_GGUF = "F16"
REFERENCE_ONLY = ["Q8_0"]  # llama.cpp rows with no memboost counterpart
PROMPT = "The capital of France is"


# Llama-3.2-1B's and -3B's architectures (their published config.json), no weights.
LLAMA_SHAPES = {
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    head_dim=64),
    "llama3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                    head_dim=128),
}


def llama_config(name: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
                       **LLAMA_SHAPES[name])


def load(name: str):
    """(model in the dtype memboost computes in, tokenizer or None, that dtype)."""
    if name == "smollm2":
        model, tokenizer = memboost.testbed.load_smollm2()
        return model, tokenizer, torch.float32
    if name in LLAMA_SHAPES:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(name))
        model = model.to_empty(device="cpu").to(torch.bfloat16).eval()  # random bf16 weights, as a checkpoint holds
        model.tie_weights()  # to_empty made the lm_head its own tensor again
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)  # its buffers were on meta
        model.generation_config.eos_token_id = None
        return model, None, torch.bfloat16
    raise SystemExit(f"unknown model {name!r}: smollm2, {', '.join(LLAMA_SHAPES)}")


def prompts_for(tokenizer, vocab: int, count: int):
    """`count` prompts of 4..11 tokens (the first from PROMPT when there is a tokenizer)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(count):
        if tokenizer is not None and i == 0:
            rows.append(tokenizer(PROMPT)["input_ids"])
        else:
            rows.append(torch.randint(100, vocab, (4 + (3 * i) % 8,), generator=g).tolist())
    return rows


def best_rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return tokens / best


def memboost_rates(model, rows, args):
    """{batch: tokens/s} through memboost.runtime for batch 1 and each of args.batches."""
    decoder = Decoder(model, max_batch=max([1] + args.batches), max_length=max(map(len, rows)) + args.tokens)
    rates = {1: best_rate(lambda: decoder.generate(rows[:1], max_new_tokens=args.tokens), args.tokens, args.repeats)}
    for b in args.batches:
        rates[b] = best_rate(lambda: decoder.generate(rows[:b], max_new_tokens=args.tokens), b * args.tokens,
                             args.repeats)
    return rates


def hf_eager_rate(model, rows, args) -> float:
    ids = torch.tensor([rows[0]])
    model = copy.deepcopy(model).float()

    def run():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                           min_new_tokens=args.tokens, do_sample=False)
    return best_rate(run, args.tokens, args.repeats)


def llama_cpp_rate(path: str, rows, args) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=path, n_ctx=max(map(len, rows)) + args.tokens + 8, n_batch=64,
                          n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(), verbose=False)

    vocab = llm.n_vocab()

    def greedy() -> int:  # llama-cpp-python keeps no logits without logits_all: read the context's last row
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def run():  # the prompt, then tokens - 1 steps: `tokens` greedy tokens, as memboost and transformers count
        llm.reset()
        llm.eval(rows[0])
        for _ in range(args.tokens - 1):
            llm.eval([greedy()])
    rate = best_rate(run, args.tokens, args.repeats)
    llm.close()
    return rate


def llama_cpp_batch_rate(path: str, rows, batch: int, vocab: int, args) -> float:
    """tokens/s of `batch` prompts decoded together by llama.cpp (one sequence id each, llama_decode on
    one llama_batch per step), through llama-cpp-python's low-level API."""
    import llama_cpp as L
    import numpy as np

    rows = rows[:batch]
    prompt_tokens = sum(map(len, rows))
    llm = L.Llama(model_path=path, n_ctx=16, verbose=False)  # the weights; the context is made here
    params = L.llama_context_default_params()
    params.n_ctx = batch * (max(map(len, rows)) + args.tokens + 8)
    params.n_batch = params.n_ubatch = max(prompt_tokens, batch)
    params.n_seq_max = batch
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    ctx = L.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    lb = L.llama_batch_init(max(prompt_tokens, batch), 0, batch)

    def decode(entries):  # (token, position, sequence, wants logits)
        lb.n_tokens = len(entries)
        for i, (token, pos, seq, out) in enumerate(entries):
            lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = token, pos, 1, int(out)
            lb.seq_id[i][0] = seq
        if L.llama_decode(ctx, lb) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,))))

    def run():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        entries, last = [], []
        for seq, r in enumerate(rows):
            entries += [(t, j, seq, j == len(r) - 1) for j, t in enumerate(r)]
            last.append(len(entries) - 1)
        decode(entries)
        tokens = [greedy(i) for i in last]
        for step in range(args.tokens - 1):
            decode([(tokens[seq], len(r) + step, seq, True) for seq, r in enumerate(rows)])
            tokens = [greedy(seq) for seq in range(batch)]
    try:
        return best_rate(run, batch * args.tokens, args.repeats)
    finally:
        L.llama_batch_free(lb)
        L.llama_free(ctx)
        llm.close()


def bench_model(name: str, args, tmp: str):
    model, tokenizer, dtype = load(name)
    vocab = model.config.vocab_size
    rows = prompts_for(tokenizer, vocab, max([1] + args.batches))
    results = []
    print(f"[{name}] llama.cpp on memboost's GGUF export", flush=True)
    llama_cpp = {}
    gguf_types = sorted({FORMATS[f][1] for f in args.formats if f in FORMATS} | {FLOAT_GGUF} | set(REFERENCE_ONLY))
    for qtype in gguf_types if not args.no_llama_cpp else []:
        path = os.path.join(tmp, f"{name}-{qtype}.gguf")
        memboost.export_gguf(model, path, qtype, tokenizer, verbose=False, progress=False)
        try:
            llama_cpp[qtype, 1] = llama_cpp_rate(path, rows, args)
            for b in args.batches:
                llama_cpp[qtype, b] = llama_cpp_batch_rate(path, rows, b, vocab, args)
        except ImportError as exc:
            print(f"llama.cpp skipped: {exc}", flush=True)
            break
        finally:
            os.remove(path)
        for b in [1] + args.batches:
            results.append({"model": name, "path": f"llama.cpp {qtype}", "gguf": qtype, "batch": b,
                            "tokens_per_s": llama_cpp[qtype, b]})
            print(f"  llama.cpp {qtype} batch {b}: {llama_cpp[qtype, b]:.1f} tokens/s", flush=True)
    if not args.no_transformers:
        print(f"[{name}] transformers eager float32", flush=True)
        results.append({"model": name, "path": "transformers eager float32", "gguf": FLOAT_GGUF, "batch": 1,
                        "tokens_per_s": hf_eager_rate(model, rows, args)})
    if "float" in args.formats:
        print(f"[{name}] memboost.runtime float", flush=True)
        float_model = model
        for b, rate in memboost_rates(float_model, rows, args).items():
            results.append({"model": name, "path": f"memboost.runtime float ({str(dtype)[6:]})", "gguf": FLOAT_GGUF,
                            "batch": b, "tokens_per_s": rate})
    for fmt in [f for f in args.formats if f != "float"]:
        params, qtype = FORMATS[fmt]
        for lm_head in args.lm_heads:
            for act_bits in (None, 8):
                label = f"memboost {fmt}" + (" act8" if act_bits else "")
                print(f"[{name}] {label}, lm_head {lm_head}", flush=True)
                quantized = copy.deepcopy(model)  # the float model stays for the next format
                kwargs = dict(params)
                method = kwargs.pop("method")
                if act_bits:
                    kwargs["act_bits"] = act_bits
                report = memboost.quantize_model(quantized, method, progress=False,
                                                 lm_head=None if lm_head == "float" else lm_head, **kwargs)
                for b, rate in memboost_rates(quantized, rows, args).items():
                    results.append({"model": name, "path": label, "lm_head": lm_head, "gguf": qtype, "batch": b,
                                    "bits_per_weight": round(report.bits_per_weight, 2), "tokens_per_s": rate})
                del quantized
                gc.collect()
    for r in results:
        ref = llama_cpp.get((r["gguf"], r["batch"]))
        r["llama_cpp_tokens_per_s"] = ref
        r["ratio_to_llama_cpp"] = r["tokens_per_s"] / ref if ref else None
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama1b", help="comma-separated: smollm2, llama1b, llama3b")
    ap.add_argument("--formats", default="float,mixed,nf4,ternary,lort", help="comma-separated memboost formats")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens generated per prompt")
    ap.add_argument("--batches", default="8,16", help="batch sizes of the throughput table ('' for none)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (the best is kept)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    ap.add_argument("--lm-heads", default="int8",
                    help="comma-separated output layers of the memboost rows: int8 (quantize_model's default, "
                         "llama.cpp's Q8_0 layout) and/or float")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' eager float32 row")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "generate_cpu.json"))
    args = ap.parse_args()
    args.formats = [f for f in args.formats.split(",") if f]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.lm_heads = [h for h in args.lm_heads.split(",") if h]
    if not args.lm_heads or any(h not in ("int8", "float") for h in args.lm_heads):
        raise SystemExit(f"--lm-heads takes int8 and/or float, got {args.lm_heads}")
    unknown = [f for f in args.formats if f != "float" and f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown formats {unknown}: float, {', '.join(FORMATS)}")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            results += bench_model(name, args, tmp)
    for r in results:
        r["tokens_per_s"] = round(r["tokens_per_s"], 2)
        if r["ratio_to_llama_cpp"] is not None:
            r["ratio_to_llama_cpp"] = round(r["ratio_to_llama_cpp"], 3)
    columns = ["model", "path", "lm_head", "bits_per_weight", "gguf", "tokens_per_s", "ratio_to_llama_cpp"]
    title = f"batch 1, {args.tokens} greedy tokens after a short prompt, {args.threads} threads"
    print_table([r for r in results if r["batch"] == 1], columns, title)
    batched = [r for r in results if r["batch"] > 1]
    if batched:
        print_table(batched, ["model", "path", "batch"] + columns[2:],
                    f"batches of prompts (4..11 tokens, left-padded), {args.tokens} tokens each; tokens_per_s = "
                    f"batch x tokens / time; the ratio is to llama.cpp at that type and batch")
    meta = {"tokens": args.tokens, "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "memboost": memboost.__version__}
    try:
        import llama_cpp

        meta["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, {"benchmark": "generate", **meta, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
