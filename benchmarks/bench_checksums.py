"""What checking the saved CRC-32s costs at load: SmolLM2-135M quantized to NF4
and saved (save_quantized), then load_quantized with verify=True and
verify=False, and the check alone (FileChecksums.verify over every file); the
same for a .lort file written from the same model's tensors (LoRT layers are
not needed for the cost of the check: the uncompressed-tensor records carry
the same CRC-32 over the same bytes). Files are read from the page cache
(loaded once before timing): the figure is the CPU cost of the check.

    python benchmarks/bench_checksums.py [--folder SAVED_DIR] [--json benchmarks/results/checksums_cpu.json]
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_cpu, write_json  # noqa: E402

import memboost  # noqa: E402
from memboost.io.serialization import FileChecksums  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="", help="a folder save_quantized wrote (default: SmolLM2 NF4, made here)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if not folder:
            model, tokenizer = memboost.testbed.load_smollm2()
            memboost.quantize_model(model, "nf4", progress=False)
            folder = os.path.join(scratch, "smollm2-nf4")
            memboost.save_quantized(model, folder, tokenizer=tokenizer)
            del model
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
        nbytes = sum(os.path.getsize(f) for f in files)
        rows = []

        def row(what, seconds, size):
            rows.append({"what": what, "ms": 1e3 * seconds, "MB/s": size / seconds / 1e6 if size else None})

        row("load_quantized, verify=True", time_cpu(lambda: memboost.load_quantized(folder), min_time=2), None)
        row("load_quantized, verify=False",
            time_cpu(lambda: memboost.load_quantized(folder, verify=False), min_time=2), None)
        row("check alone (FileChecksums.verify)",
            time_cpu(lambda: [FileChecksums(f).verify() for f in files], min_time=2), nbytes)

        from lort.fileformat import load, save

        from memboost.io.checkpoint import load_state

        state = load_state(folder)
        tensors = {k: v for k, v in state.items() if v.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                                   torch.uint8, torch.int64, torch.int32)}
        seen, unique = set(), {}
        for k, v in tensors.items():  # a tied tensor once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                unique[k] = v.contiguous()
        lort_path = os.path.join(scratch, "tensors.lort")
        save(lort_path, {}, unique)
        lort_bytes = os.path.getsize(lort_path)
        row(".lort load, verify=True", time_cpu(lambda: load(lort_path), min_time=2), lort_bytes)
        row(".lort load, verify=False", time_cpu(lambda: load(lort_path, verify=False), min_time=2), None)
    print(f"\n{folder if args.folder else 'SmolLM2-135M NF4'}: {nbytes / 2**20:.1f} MiB of safetensors; "
          f".lort of the same tensors: {lort_bytes / 2**20:.1f} MiB; {torch.get_num_threads()} threads")
    print_table(rows, ["what", "ms", "MB/s"], "CRC-32 check at load")
    write_json(args.json, {"safetensors_bytes": nbytes, "lort_bytes": lort_bytes, "rows": rows})


if __name__ == "__main__":
    main()
