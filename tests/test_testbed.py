"""The offline real model and text of memboost.testbed, and memboost on them.

Bounds measured on SmolLM2-135M-Instruct (Q4_1 GGUF), the first 512 fortune
tokens in windows of 256: float32 perplexity 41.0; after quantize_linears_
with ratio_4bit=0.25 about 740 (18x: 2.8 bits per weight is harsh on a 135M
model whose weights are already 4-bit); calibrated on 1024 other tokens about
320 (7.7x). The bounds leave about 2x margin.
"""

import copy
import math
import os

import pytest
import torch

import memboost
from memboost.testbed import english_text, load_smollm2, perplexity, smollm2_gguf_path

PPL_TOKENS = 512


def test_gguf_path_exists():
    path = smollm2_gguf_path()
    assert os.path.isfile(path) and path.endswith(".gguf")
    assert os.path.getsize(path) > 50 * 2**20


def test_english_text_is_real_multiline_english():
    text = english_text()
    assert len(text) > 50_000
    assert text.count("\n") > 1000
    words = text.lower().split()
    for common in ("the", "and", "you", "of"):
        assert words.count(common) > 100
    assert "%" not in text.splitlines()  # entry separators are gone
    assert english_text(max_chars=100) == text[:100]
    assert english_text() == text  # deterministic


@pytest.mark.slow
def test_smollm2_perplexity_fp32_quantized_and_calibrated():
    model, tokenizer = load_smollm2()
    text = english_text()
    ppl_fp32 = perplexity(model, tokenizer, text, context=256, max_tokens=PPL_TOKENS)
    assert math.isfinite(ppl_fp32) and 10 < ppl_fp32 < 100

    # calibration reads tokens disjoint from the evaluated ones
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    calib = ids[PPL_TOKENS:PPL_TOKENS + 1024]
    stats = memboost.calibrate(model, (calib[i:i + 256].unsqueeze(0) for i in range(0, len(calib), 256)))
    assert len(stats) == 30 * 7

    ppl = {}
    for calibrated in (False, True):
        q = memboost.quantize_linears_(copy.deepcopy(model), ratio_4bit=0.25,
                                       calibration=stats if calibrated else None)
        assert sum(isinstance(m, memboost.nn.MixedLinear) for m in q.modules()) == 30 * 7
        ppl[calibrated] = perplexity(q, tokenizer, text, context=256, max_tokens=PPL_TOKENS)
        assert math.isfinite(ppl[calibrated]) and ppl_fp32 < ppl[calibrated] < 40 * ppl_fp32
    assert ppl[True] < 0.8 * ppl[False]
    # Without calibration, quarter-step zero points (lower weight error) cost
    # perplexity: the reason exact_zero defaults to on when uncalibrated.
    q = memboost.quantize_linears_(copy.deepcopy(model), ratio_4bit=0.25, exact_zero=False)
    assert perplexity(q, tokenizer, text, context=256, max_tokens=PPL_TOKENS) > 1.5 * ppl[False]
