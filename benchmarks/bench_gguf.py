"""GGUF export of SmolLM2-135M-Instruct, judged by llama.cpp.

For each GGUF type: memboost.export_gguf of the model (float weights, and an
NF4-quantized copy to IQ4_NL, the size-first export, and Q5_0, the export
that keeps the NF4 model's behaviour: --nf4-types); Q4_0 and IQ4_NL again with a calibration
(memboost.calibrate on --calib-tokens fortune tokens, not the evaluated
text: what calibration buys); then llama.cpp's own quantizer
(llama_cpp.llama_model_quantize, no importance matrix) applied to our F16
export at the same types, as reference rows: its default type mixes (which
give some tensors more bits: IQ4_NL puts the first layers' ffn_down in Q5_K)
and `pure` (every matrix in the named type and the output in Q8_0, as
ours). Every file
is scored twice on the same token windows:
- ppl llama.cpp: perplexity computed by llama.cpp (llama-cpp-python) running
  the file;
- ppl memboost: the PyTorch model with the file's weights dequantized
  (memboost.gguf.gguf_state_dict), which must agree with llama.cpp up to
  its activation rounding;
with the file size and bits per weight (file bits over all weights, the
token embedding included). Text: Debian's GPL-3 (English prose that is not
fortunes), the first --tokens tokens in windows of 256, the first token of
each window context only (memboost.testbed.perplexity's convention).

    python benchmarks/bench_gguf.py [--tokens 2048] [--types ...] [--nf4-types IQ4_NL,Q5_0]
                                    [--nf4-calibrated-types Q5_0] [--threads N]
                                    [--json benchmarks/results/gguf_cpu.json]

The NF4 rows also give the decoder matrices' bits per weight and llama.cpp's
perplexity over the NF4 model's own ("llama.cpp vs source %"); --types ""
runs only the NF4 model's rows (README's NF4 table:
--types "" --nf4-types IQ4_NL,Q5_0 --nf4-calibrated-types Q5_0,IQ4_NL --threads 1).
"""

import argparse
import copy
import ctypes
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memboost  # noqa: E402
from memboost.io.gguf.export import export_gguf, gguf_state_dict  # noqa: E402
from common import print_table, write_json  # noqa: E402

TEXT = "/usr/share/common-licenses/GPL-3"
OURS = ["F16", "Q8_0", "Q5_0", "Q4_0", "IQ4_NL", "Q4_K", "Q3_K", "Q2_K"]
LLAMA_CPP = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
             "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
             "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}


def windows(tokenizer, tokens: int, window: int = 256):
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:tokens]
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]


def nll(logits: torch.Tensor, ids) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum"))


def ppl_llama_cpp(path: str, wins, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=256, n_batch=256, n_threads=threads,
                          verbose=False)
    total = count = 0
    try:
        for w in wins:
            llm.reset()
            llm.eval(w)
            total += nll(torch.from_numpy(np.array(llm.scores[:len(w)])), w)
            count += len(w) - 1
    finally:
        llm.close()
    return math.exp(total / count)


def ppl_torch(model, wins) -> float:
    total = count = 0
    with torch.inference_mode():
        for w in wins:
            total += nll(model(torch.tensor([w])).logits[0], w)
            count += len(w) - 1
    return math.exp(total / count)


def matrix_bits(path: str) -> float:
    """Stored bits per weight of the decoder's matrices (blk.*, 2-D): the
    weights a memboost format such as NF4 quantizes, without the token
    embedding / output matrix, norms and biases."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def nf4_bits(model) -> float:
    """Stored bits per weight of a memboost-quantized model's quantized matrices (codes and scales)."""
    from memboost.nn import QuantizedLinear

    tensors = [m.weight.tensor() for m in model.modules() if isinstance(m, QuantizedLinear)]
    return 8.0 * sum(t.nbytes for t in tensors) / sum(t.numel() for t in tensors)


def score(path, source, producer, qtype, model, float_model, wins, seconds, numel, threads, reference=None):
    float_model.load_state_dict(gguf_state_dict(path, model), strict=False)
    float_model.tie_weights()
    size = os.path.getsize(path)
    row = {"source": source, "by": producer, "type": qtype, "MiB": size / 2**20, "bits/weight": 8 * size / numel,
           "bits/weight matrices": matrix_bits(path), "ppl llama.cpp": ppl_llama_cpp(path, wins, threads),
           "ppl memboost": ppl_torch(float_model, wins), "export s": seconds}
    if reference:   # the model the file was exported from, run by PyTorch: what the export costs
        row["llama.cpp vs source %"] = 100.0 * (row["ppl llama.cpp"] / reference - 1.0)
    print(row, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--types", default=",".join(OURS))
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--nf4-types", default="IQ4_NL,Q5_0",
                    help="GGUF types of the NF4 model's exports (Q5_K runs in llama.cpp only where it does not "
                         "crash: llama-cpp-python 0.3.36 segfaults on Q5_K files on some Xeons)")
    ap.add_argument("--nf4-calibrated-types", default="Q5_0",
                    help="GGUF types of the NF4 model's exports with a calibration (memboost.calibrate of the NF4 "
                         "model itself, quantized=True, on --calib-tokens fortune tokens): the export that keeps "
                         "its behaviour is Q5_0 calibrated")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of llama.cpp and PyTorch")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    model, tokenizer = memboost.testbed.load_smollm2()
    wins = windows(tokenizer, args.tokens)
    numel = sum(p.numel() for p in model.parameters())     # tied embedding counted once
    float_model = copy.deepcopy(model)
    rows = [{"source": "float32", "by": "PyTorch", "type": "F32", "MiB": 4 * numel / 2**20, "bits/weight": 32.0,
             "ppl llama.cpp": None, "ppl memboost": ppl_torch(model, wins), "export s": None}]
    types = [t for t in args.types.split(",") if t]
    threads = args.threads
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        f16 = os.path.join(tmp, "F16.gguf")
        for qtype in types:
            path = os.path.join(tmp, f"{qtype}.gguf")
            start = time.perf_counter()
            export_gguf(model, path, qtype, tokenizer, verbose=False, progress=False)
            rows.append(score(path, "float", "memboost", qtype, model, float_model, wins,
                              time.perf_counter() - start, numel, threads))
            if qtype != "F16":
                os.unlink(path)
        calibrated = [t for t in types if t in memboost.gguf_quants.IMPORTANCE_TYPES]
        if calibrated:
            from memboost.cli import read_text, token_windows

            stats = memboost.calibrate(model, token_windows(tokenizer, read_text("fortunes"), args.calib_tokens))
            for qtype in calibrated:
                path = os.path.join(tmp, f"cal-{qtype}.gguf")
                start = time.perf_counter()
                export_gguf(model, path, qtype, tokenizer, calibration=stats, verbose=False, progress=False)
                rows.append(score(path, f"float, calibrated ({args.calib_tokens} fortune tokens)", "memboost",
                                  qtype, model, float_model, wins, time.perf_counter() - start, numel, threads))
                os.unlink(path)
        if "F16" not in types and any(t in LLAMA_CPP for t in types):
            export_gguf(model, f16, "F16", tokenizer, verbose=False, progress=False)
        for qtype in types:
            if qtype not in LLAMA_CPP:
                continue
            for pure in (False, True):
                path = os.path.join(tmp, f"llama-{qtype}.gguf")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, LLAMA_CPP[qtype])
                params.nthread = threads
                params.pure = pure
                if pure:   # the output matrix (the tied token embedding) in Q8_0, as ours
                    params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
                start = time.perf_counter()
                if llama_cpp.llama_model_quantize(f16.encode(), path.encode(), ctypes.byref(params)) != 0:
                    raise RuntimeError(f"llama_model_quantize failed for {qtype}")
                name = LLAMA_CPP[qtype][len("LLAMA_FTYPE_MOSTLY_"):] + (" pure" if pure else "")
                rows.append(score(path, "F16 export", "llama.cpp", name, model, float_model, wins,
                                  time.perf_counter() - start, numel, threads))
                os.unlink(path)
        # a memboost-quantized model: NF4 (bitsandbytes' format) to IQ4_NL, and to F16 for its own quality
        nf4 = copy.deepcopy(model)
        memboost.quantize_model(nf4, "nf4", progress=False)
        nf4_ppl = ppl_torch(nf4, wins)
        rows.append({"source": "nf4", "by": "PyTorch", "type": "NF4 (decoder linears)", "MiB": None,
                     "bits/weight": None, "bits/weight matrices": nf4_bits(nf4),
                     "ppl llama.cpp": None, "ppl memboost": nf4_ppl, "export s": None})
        # the NF4 model's exports: IQ4_NL (size first, 4.5 bits) and Q5_0 (5.5
        # bits, its behaviour kept); --nf4-types picks them
        nf4_stats = None
        if args.nf4_calibrated_types:
            from memboost.cli import read_text, token_windows

            nf4_stats = memboost.calibrate(nf4, token_windows(tokenizer, read_text("fortunes"), args.calib_tokens),
                                           progress=False, quantized=True)
        runs = [(t, None) for t in args.nf4_types.split(",") if t]
        runs += [(t, nf4_stats) for t in args.nf4_calibrated_types.split(",") if t]
        for qtype, stats in runs:
            path = os.path.join(tmp, f"nf4-{qtype}.gguf")
            start = time.perf_counter()
            export_gguf(nf4, path, qtype, tokenizer, calibration=stats, verbose=False, progress=False)
            source = "nf4" if stats is None else f"nf4, calibrated ({args.calib_tokens} fortune tokens)"
            rows.append(score(path, source, "memboost", qtype, nf4, float_model, wins,
                              time.perf_counter() - start, numel, threads, reference=nf4_ppl))
            os.unlink(path)
    columns = ["source", "by", "type", "MiB", "bits/weight", "bits/weight matrices", "ppl llama.cpp",
               "llama.cpp vs source %", "ppl memboost", "export s"]
    print_table(rows, columns, title=f"SmolLM2-135M GGUF: perplexity on {sum(len(w) for w in wins)} tokens of "
                                     f"GPL-3 (windows of 256), {torch.get_num_threads()} threads")
    write_json(args.json, {"model": "SmolLM2-135M-Instruct", "text": TEXT, "tokens": args.tokens, "window": 256,
                           "torch_threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
