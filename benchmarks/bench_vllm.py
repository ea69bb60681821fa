"""Serving throughput on vLLM's CPU backend: memboost folders (each format,
through memboost.integrations.vllm) against vLLM's own bf16 on the same model,
and against memboost's own decode loop (memboost.runtime.Decoder) on the
same folder, at batch 1, 16 and 64.

Each batch: that many prompts of different lengths (the first words of
Debian's fortunes) decoded greedily together, `--tokens` new tokens each
(ignore_eos); tokens/s = batch * tokens / wall time of the whole call
(prefill included), best of `--repeats` after a warm-up call. vLLM runs in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one engine at a time, with
enforce_eager (the default CPU path traces the model with dynamo and compiles
it with inductor: `--compile` measures that instead).

Needs the vLLM virtualenv (`make test-vllm` sets it up):

    ~/.cache/memboost/vllm-venv/bin/python benchmarks/bench_vllm.py                     # SmolLM2-135M
    ~/.cache/memboost/vllm-venv/bin/python benchmarks/bench_vllm.py --model tiny --batches 1,2 --tokens 4 \\
        --formats mixed --repeats 1                                                       # a quick check

The memboost folders keep quantize_model's default int8 output layer.
"""

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; batch 64 of SmolLM2 needs about 1
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# vLLM's CPU worker otherwise cuts torch to one thread for serving ("Reducing Torch
# threads"), and that holds for the whole process: every row gets the same threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

import memboost  # noqa: E402
from memboost.runtime import Decoder  # noqa: E402

FORMATS = {
    "mixed": dict(method="mixed", ratio_4bit=0.5),
    "nf4": dict(method="nf4"),
    "ternary": dict(method="ternary"),
    "lort": dict(method="lort", rank=64, iters=3),
}


def load_model(name: str):
    """(float32 model, tokenizer)."""
    if name == "smollm2":
        return memboost.testbed.load_smollm2()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([memboost.testbed.english_text(200_000)],
                            trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompts_for(tokenizer, batch: int):
    entries = [e for e in memboost.testbed.english_text(400_000).split("\n\n") if len(e.split()) >= 24]
    return [tokenizer(" ".join(entries[i].split()[:8 + i % 16]))["input_ids"] for i in range(batch)]


def best_rate(fn, batch: int, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return batch * tokens / best


def vllm_rates(folder: str, dtype: str, batches, tokens: int, repeats: int, compile_model: bool):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype=dtype, enforce_eager=not compile_model, max_model_len=512,
              max_num_seqs=max(batches), seed=0)
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rates = {}
    for batch in batches:
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts_for(tokenizer, batch)]
        rates[batch] = best_rate(lambda: llm.generate(requests, params, use_tqdm=False), batch, tokens, repeats)
    del llm
    gc.collect()
    return rates


def memboost_rates(folder: str, dtype: torch.dtype, tokenizer, batches, tokens: int, repeats: int):
    model = memboost.load_quantized(folder, dtype=dtype)
    rates = {}
    for batch in batches:
        rows = prompts_for(tokenizer, batch)
        decoder = Decoder(model, max_batch=batch, max_length=max(map(len, rows)) + tokens)
        with torch.inference_mode():
            rates[batch] = best_rate(lambda: decoder.generate(rows, max_new_tokens=tokens), batch, tokens, repeats)
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="vLLM's dtype and memboost's compute dtype")
    ap.add_argument("--compile", action="store_true", help="vLLM's default CPU compilation instead of eager")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                    "vllm_cpu.json"))
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model(args.model)
        float_dir = os.path.join(tmp, "float")
        model.to(dtype).save_pretrained(float_dir)
        tokenizer.save_pretrained(float_dir)
        model.float()
        for batch, rate in vllm_rates(float_dir, args.dtype, batches, args.tokens, args.repeats,
                                      args.compile).items():
            rows.append({"model": args.model, "format": args.dtype, "engine": "vllm", "batch": batch,
                         "tokens_per_s": round(rate, 2)})
        for fmt in args.formats.split(","):
            params = dict(FORMATS[fmt])
            quantized, _ = load_model(args.model)
            memboost.quantize_model(quantized, params.pop("method"), progress=False, **params)
            folder = os.path.join(tmp, fmt)
            memboost.save_quantized(quantized, folder, tokenizer=tokenizer)
            del quantized
            for engine, rates in (("vllm", vllm_rates(folder, args.dtype, batches, args.tokens, args.repeats,
                                                      args.compile)),
                                  ("memboost", memboost_rates(folder, dtype, tokenizer, batches, args.tokens,
                                                              args.repeats))):
                for batch, rate in rates.items():
                    rows.append({"model": args.model, "format": fmt, "engine": engine, "batch": batch,
                                 "tokens_per_s": round(rate, 2)})
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["engine"] == "vllm" and r["format"] == args.dtype}
    for r in rows:
        r["vs_vllm_" + args.dtype] = round(r["tokens_per_s"] / base[r["batch"]], 3)
    print_table(rows, ["model", "format", "engine", "batch", "tokens_per_s", "vs_vllm_" + args.dtype],
                f"vLLM CPU throughput ({args.tokens} tokens per prompt)")
    write_json(args.json, {"config": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
