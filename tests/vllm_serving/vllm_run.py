"""Runs vLLM on a saved folder and prints the greedy tokens of each prompt as
one JSON line ("TOKENS [[...], ...]"). A script of its own: vLLM's engine
starts processes, so its offline API must run under a __main__ guard, and a
failure (e.g. a refused checkpoint) then shows as this process's exit status
and stderr.

    python tests/vllm_serving/vllm_run.py FOLDER --prompts '[[5, 6, 7]]' [--max-tokens 32] [--tp 2]
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the tests' models are tiny

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.folder, dtype=args.dtype, tensor_parallel_size=args.tp, enforce_eager=True,
              max_model_len=256, max_num_seqs=8, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in json.loads(args.prompts)], params,
                           use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
