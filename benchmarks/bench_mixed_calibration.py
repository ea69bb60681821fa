"""How the mixed format's calibration generalizes: SmolLM2-135M quantized
with each calibration method, judged on two texts of different kinds.

Methods (memboost.quantize_model, method="mixed"):
- none:        plain rounding, no calibration
- diag:        memboost.calibrate's per-input-channel mean square (the
               error weighting of every group decision), float model's inputs
- diag-seq:    the same statistics measured sequentially: each stage (q/k/v,
               o, gate/up, down of every block) on the inputs the already
               quantized earlier stages produce (calibration_batches=)
- hessian:     full X^T X per layer from the float model: the GPTQ-style
               sweep (error of each quantized column spread to the later ones),
               X^T X shrunk toward its diagonal by --shrink
- hessian-seq: the sweep with sequentially measured X^T X

Settings: --ratios (the same ratio_4bit in every layer) and --bits (a
budget of bits per weight; memboost.allocate_ratio_4bit chooses each
layer's ratio_4bit from the float model's loss gradients, the plan made
once per budget, before the layers are quantized with each method).

Calibration text (--calib): "fortunes" (Debian's fortunes after the
evaluated ones) or "varied" (the same fortune tokens plus manuals and
release notes of other Debian packages, in equal shares: technical prose;
no license text, since one evaluation text is a license). Evaluation:
perplexity on the first --tokens tokens of the fortunes and of
/usr/share/common-licenses/GPL-3, windows of 256.

    python benchmarks/bench_mixed_calibration.py [--ratios 0.25,0.5,1] [--bits 2.9,3.5] [--methods diag,hessian]
        [--calib varied] [--calib-tokens 8192] [--damp 0.01] [--shrink 0.5] [--group-size 64]
        [--json benchmarks/results/mixed_calibration_cpu.json]
"""

import argparse
import copy
import gzip
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.cli import token_windows  # noqa: E402
from common import print_table, write_json  # noqa: E402

GPL3 = "/usr/share/common-licenses/GPL-3"
# Other Debian-packaged English prose (present on this test bed: man-db, libpng16-16, git, dpkg docs).
OTHER_TEXTS = ["/usr/share/doc/man-db/man-db-manual.txt.gz", "/usr/share/doc/libpng16-16/libpng-manual.txt.gz",
               "/usr/share/doc/dpkg/spec/triggers.txt", "/usr/share/doc/git/RelNotes/2.27.0.txt"]
METHODS = ("none", "diag", "diag-seq", "hessian", "hessian-seq")


def read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def calibration_windows(tokenizer, kind: str, tokens: int, skip: int):
    fortunes = memboost.testbed.english_text()
    if kind == "fortunes":
        return token_windows(tokenizer, fortunes, tokens, skip=skip)
    missing = [p for p in OTHER_TEXTS if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"--calib varied needs {missing} (Debian packages man-db, libpng16-16, dpkg, git)")
    share = tokens // (len(OTHER_TEXTS) + 1)
    wins = token_windows(tokenizer, fortunes, share, skip=skip)
    for path in OTHER_TEXTS:
        wins += token_windows(tokenizer, read(path), share)
    return wins


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.25,0.5,1", help="ratio_4bit settings, the same in every layer ('' for none)")
    ap.add_argument("--bits", default="", help="bits-per-weight budgets, ratio_4bit chosen per layer "
                                               "(memboost.allocate_ratio_4bit)")
    ap.add_argument("--methods", default="diag,hessian")
    ap.add_argument("--calib", choices=("fortunes", "varied"), default="varied")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=2048, help="evaluated tokens of each text")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of mean diag(H))")
    ap.add_argument("--shrink", type=float, default=0.5, help="H shrunk toward its diagonal by this fraction")
    ap.add_argument("--group-size", type=int, default=64, help="input columns per group")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    settings = [("ratio_4bit", float(r)) for r in args.ratios.split(",") if r]
    settings += [("bits", float(b)) for b in args.bits.split(",") if b]

    model, tokenizer = memboost.testbed.load_smollm2()
    texts = {"fortunes": memboost.testbed.english_text(), "GPL-3": read(GPL3)}

    def ppl(m):
        return {name: memboost.testbed.perplexity(m, tokenizer, text, max_tokens=args.tokens)
                for name, text in texts.items()}

    calib = calibration_windows(tokenizer, args.calib, args.calib_tokens, skip=args.tokens)
    rows = [{"setting": "float32", "method": "", "bits": 32.0, **ppl(model), "quantize s": None}]
    print(rows[-1], flush=True)

    # Statistics of the float model, measured once and shared by the rows
    # (with the time each took, which a user pays once per model).
    measured, seconds_of = {}, {}

    def measure(name, fn):
        if name not in measured:
            start = time.perf_counter()
            measured[name] = fn()
            seconds_of[name] = time.perf_counter() - start
            print(f"{name}: {seconds_of[name]:.0f} s", flush=True)
        return measured[name]

    plans = {}
    for kind, value in settings:
        for method in methods:
            m = copy.deepcopy(model)
            kw = {"group_size": args.group_size}
            if method.startswith("hessian"):
                kw.update(damp=args.damp, shrink=args.shrink)
            if method in ("diag", "hessian"):
                kw["calibration"] = measure(method, lambda: memboost.calibrate(model, calib,
                                                                               hessian=method == "hessian"))
            elif method.endswith("-seq"):
                kw["calibration_batches"] = calib
                kw["hessian"] = method == "hessian-seq"
            if kind == "bits":
                # The plan depends on the float model and the text only: made once per budget.
                if value not in plans:
                    start = time.perf_counter()
                    diag = measure("diag", lambda: memboost.calibrate(model, calib))
                    sensitivity = measure("sensitivity", lambda: memboost.output_sensitivity(model, calib))
                    plans[value] = memboost.allocate_ratio_4bit(model, calib, bits=value, group_size=args.group_size,
                                                                calibration=diag, sensitivity=sensitivity)
                    seconds_of[f"plan {value}"] = time.perf_counter() - start
                kw["ratio_4bit"] = plans[value]
                setting = f"{value} bits, planned"
            else:
                kw["ratio_4bit"] = value
                setting = f"ratio_4bit {value}"
            start = time.perf_counter()
            report = memboost.quantize_model(m, "mixed", progress=False, **kw)
            seconds = time.perf_counter() - start
            rows.append({"setting": setting, "method": method, "bits": report.bits_per_weight, **ppl(m),
                         "quantize s": seconds})
            print(rows[-1], flush=True)
    print("measured once (s):", {k: round(v, 1) for k, v in seconds_of.items()})
    columns = ["setting", "method", "bits", "fortunes", "GPL-3", "quantize s"]
    print_table(rows, columns, title=f"SmolLM2-135M mixed, groups of {args.group_size}: perplexity "
                                     f"({args.tokens} tokens, windows of 256), calibrated on {args.calib_tokens} "
                                     f"tokens of {args.calib!r} text")
    write_json(args.json, {"model": "SmolLM2-135M-Instruct", "calib": args.calib, "calib_tokens": args.calib_tokens,
                           "eval_tokens": args.tokens, "damp": args.damp, "shrink": args.shrink,
                           "group_size": args.group_size,
                           "measured_once_s": seconds_of, "rows": rows})


if __name__ == "__main__":
    main()
