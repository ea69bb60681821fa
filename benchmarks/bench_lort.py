"""LoRT (W ~ alpha*T + A@B.T) on SmolLM2-135M: quality at honest bits, compression time, speed, memory.

Quality, over the 210 decoder linears (q/k/v/o, gate/up/down of 30 layers),
each with its bits per weight as stored (every scale, factor and pad
counted; the mean over the linears, weighted by their weights):
- float32 (the Q4_1 GGUF weights dequantized, memboost/testbed.py);
- ternary only: memboost.ternary (per-row absmean, BitNet's rule) and the
  exact best ternary fit (LoRT at rank 0, per-row alpha);
- LoRT at bit budgets (--max-bits per layer, per-row alpha);
- the mixed 2/4/16-bit format at neighbouring bits, uncalibrated and
  calibrated (memboost.calibrate on fortunes after the evaluated ones);
columns: mean relative weight error, perplexity on two real English texts
of different kinds, Debian's fortunes and the GPL-3 licence text
(/usr/share/common-licenses/GPL-3), windows of 256; whole-model quantization
time on the CPU.

Speed: LoRTLinear (exact and act_bits=8) vs nn.Linear on the float32 weight
at the SmolLM2 shapes (and 4096x4096), batch 1 and 8, weights streamed from
DRAM (a round robin over copies totalling 128 MiB), ratios in one process.

Memory: lort-compress on SmolLM2 saved as sharded float16 safetensors, in a
subprocess: peak RSS against the RSS of the same interpreter after importing
what it imports, and the size of the largest layer.

    python benchmarks/bench_lort.py [--quick] [--json benchmarks/results/lort_cpu.json]
    python benchmarks/bench_lort.py --only quality --budgets 2.5 3.0 --ratios --lort-calibrated --iters 4 \
        --threads 1 --json benchmarks/results/lort_calibrated_cpu.json   # LoRT plain vs with H

--lort-calibrated adds LoRT rows decomposed for the output error
(lort.decompose(H=...), each layer's H = X^T X / rows measured block by
block on the 1024 fortune tokens after the first 8192, which hold the
evaluated ones, through the layers already decomposed).

About 25 minutes on a quiet 2-core CPU (--quick: 2 budgets, 2 calibrated mixed rows, 1024 tokens).
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.nn import LoRTLinear  # noqa: E402
from memboost.testbed import english_text, load_smollm2, perplexity  # noqa: E402
from common import copies_exceeding, print_table, stream_time, write_json  # noqa: E402

GPL = "/usr/share/common-licenses/GPL-3"
CONTEXT = 256


def decoder_linears(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and "layers." in name]


def quality_row(label, model, weights_before, texts, tokens, seconds, tokenizer):
    bits = errs = count = 0.0
    for name, module in model.named_modules():
        if name in weights_before and hasattr(module, "weight"):
            w = weights_before[name]
            w_hat = module.weight.dequantize() if hasattr(module.weight, "dequantize") else module.weight
            w_hat = w_hat.detach().float()
            b = module.weight.tensor().avg_bits if hasattr(module.weight, "tensor") else 32.0
            bits += b * w.numel()
            errs += float((w - w_hat).norm() / w.norm())
            count += 1
    n = sum(w.numel() for w in weights_before.values())
    row = {"method": label, "bits": bits / n, "weight_err": errs / count, "quantize_s": seconds}
    for key, text in texts.items():
        row[f"ppl_{key}"] = perplexity(model, tokenizer, text, context=CONTEXT, max_tokens=tokens)
    print(f"  {label}: {row}", flush=True)
    return row


def bench_quality(args):
    base, tokenizer = load_smollm2()
    texts = {"fortunes": english_text(), "gpl3": open(GPL, encoding="utf-8").read()}
    weights = {name: m.weight.detach().float().clone() for name, m in decoder_linears(base)}
    skip = ("lm_head",)
    rows = [quality_row("float32", base, weights, texts, args.tokens, 0.0, tokenizer)]
    calib_ids = tokenizer(texts["fortunes"][:400_000], add_special_tokens=False)["input_ids"][8192:8192 + 1024]
    calib = [torch.tensor(calib_ids[i:i + CONTEXT]).unsqueeze(0) for i in range(0, len(calib_ids), CONTEXT)]
    configs = [("ternary absmean (memboost.ternary)", "ternary", {}, False),
               ("ternary best fit (LoRT rank 0)", "lort", {"rank": 0, "iters": 1, "per_row_alpha": True}, False)]
    for b in args.budgets:
        configs.append((f"LoRT max_bits {b}", "lort", {"max_bits": b, "rank": 576, "iters": args.iters,
                                                       "per_row_alpha": True}, False))
        if args.lort_calibrated:
            configs.append((f"LoRT max_bits {b}, calibrated (H)", "lort",
                            {"max_bits": b, "rank": 576, "iters": args.iters, "per_row_alpha": True,
                             "shrink": args.shrink}, "sequential"))
    for ratio in args.ratios:
        if not args.quick:
            configs.append((f"mixed ratio_4bit {ratio}", "mixed", {"ratio_4bit": ratio}, False))
        configs.append((f"mixed ratio_4bit {ratio}, calibrated", "mixed", {"ratio_4bit": ratio}, True))
    for label, method, params, calibrated in configs:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if calibrated == "sequential":  # each layer's H, block by block (as lort-compress --calibrate)
            memboost.quantize_model(model, method, skip=skip, calibration_batches=calib, hessian=True,
                                    progress=False, **params)
        else:
            stats = memboost.calibrate(model, calib, skip=skip) if calibrated else None
            memboost.quantize_model(model, method, skip=skip, calibration=stats, progress=False, **params)
        seconds = time.perf_counter() - start
        rows.append(quality_row(label, model, weights, texts, args.tokens, seconds, tokenizer))
        del model
    return rows


def bench_speed(args):
    rows = []
    stream_bytes = 128 << 20
    shapes = [(576, 576, 32), (1536, 576, 32), (576, 1536, 32)] + ([] if args.quick else [(4096, 4096, 128)])
    for out_f, in_f, rank in shapes:
        g = torch.Generator().manual_seed(out_f + in_f)
        linear = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        for act_bits in (None, 8):
            layer = LoRTLinear.from_linear(linear, rank=rank, iters=1, per_row_alpha=True, act_bits=act_bits)
            dense = copies_exceeding(4 * out_f * in_f, stream_bytes, lambda: copy.deepcopy(linear))
            quant = copies_exceeding(layer.weight.tensor().nbytes, stream_bytes, lambda: copy.deepcopy(layer))
            for batch in (1, 8):
                x = torch.randn(batch, in_f)
                with torch.inference_mode():
                    t_dense = stream_time(lambda m: m(x), dense)
                    t_lort = stream_time(lambda m: m(x), quant)
                rows.append({"shape": f"{out_f}x{in_f}", "rank": rank, "act_bits": act_bits or "exact",
                             "batch": batch, "bits": layer.weight.tensor().avg_bits, "lort_ms": 1e3 * t_lort,
                             "fp32_ms": 1e3 * t_dense, "speedup": t_dense / t_lort})
                print(f"  {rows[-1]}", flush=True)
    return rows


def bench_memory(args):
    base, tokenizer = load_smollm2(torch.float16)
    largest = max(m.weight.numel() * 4 for _, m in decoder_linears(base))  # float32 while decomposed
    with tempfile.TemporaryDirectory() as folder:
        src = os.path.join(folder, "smollm2")
        base.save_pretrained(src, max_shard_size="50MB")
        tokenizer.save_pretrained(src)
        model_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        del base
        out = os.path.join(folder, "m.lort")
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "lort.compress", "-m", src, "-o", out, "--max-bits", "3.0",
                              "--iters", "2", "--quiet", "--threads", str(torch.get_num_threads())],
                             capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(run.stderr)
        seconds = time.perf_counter() - start
        print(run.stdout)
        memory = run.stdout.split("memory: ")[1]
        start_mib = float(memory.split("resident ")[1].split(" MiB")[0])
        peak_mib = float(memory.split("peak ")[1].split(" MiB")[0])
        return [{"model_fp16_mib": model_bytes / 2**20, "largest_layer_fp32_mib": largest / 2**20,
                 "rss_at_start_mib": start_mib, "rss_peak_during_mib": peak_mib,
                 "growth_mib": peak_mib - start_mib, "file_mib": os.path.getsize(out) / 2**20, "seconds": seconds}]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of each text evaluated")
    ap.add_argument("--iters", type=int, default=6, help="LoRT iterations per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.5], help="LoRT max_bits")
    ap.add_argument("--lort-calibrated", action="store_true",
                    help="also LoRT at each budget decomposed with each layer's H (lort.decompose(H=...)), "
                         "calibrated on the fortunes tokens after the evaluated ones")
    ap.add_argument("--shrink", type=float, default=0.5, help="the calibrated LoRT rows' H shrinkage")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.25, 0.5, 1.0], help="mixed ratio_4bit")
    ap.add_argument("--only", choices=["quality", "speed", "memory"], default=None)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:  # the mixed rows calibrated only, two budgets, two ratios
        args.tokens = min(args.tokens, 1024)
        args.budgets, args.ratios = args.budgets[1::2], args.ratios[1::2]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"threads": args.threads, "tokens": args.tokens, "iters": args.iters}
    if args.only in (None, "quality"):
        result["quality"] = bench_quality(args)
        print_table(result["quality"], ["method", "bits", "weight_err", "ppl_fortunes", "ppl_gpl3", "quantize_s"],
                    f"SmolLM2-135M decoder linears: quality at stored bits ({args.tokens} tokens per text, windows "
                    f"of {CONTEXT})")
    if args.only in (None, "speed"):
        result["speed"] = bench_speed(args)
        print_table(result["speed"], ["shape", "rank", "act_bits", "batch", "bits", "lort_ms", "fp32_ms", "speedup"],
                    f"LoRTLinear vs nn.Linear (float32), {args.threads} threads, weights streamed from 128 MiB")
    if args.only in (None, "memory"):
        result["memory"] = bench_memory(args)
        print_table(result["memory"], list(result["memory"][0]), "lort-compress peak memory (sharded fp16 input)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
