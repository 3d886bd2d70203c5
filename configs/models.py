"""Named model sizes. `get_config("toy")` etc.; `jaxstages.model.model_config("toy")` loads them.

Shapes of the Qwen2.5 sizes follow their published `config.json`s; `interplay-100m` is the ~100M Qwen2-shape model of
the controlled pre-/mid-/RL interplay study (Zhang, Neubig, Yue 2025; see shared REFERENCES: hidden 768, 12 layers,
12 query / 2 KV heads, intermediate 3072, RoPE theta 1e6, tied embeddings, vocab ~2.2k).
"""

import ml_collections

SIZES = {
    # ~1M parameters: learns the symbolic task family on a 2-core CPU in minutes.
    "toy": dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=384, rope_theta=10_000.0, tie_embeddings=True, qkv_bias=True,
                max_position_embeddings=1024),
    # a distillation student for the toy teacher: half the width, half the depth (~0.2M parameters)
    "toy-small": dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=192, rope_theta=10_000.0, tie_embeddings=True, qkv_bias=True,
                      max_position_embeddings=1024),
    # a few hundred thousand parameters, for unit tests that compile many variants.
    "tiny": dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, rope_theta=10_000.0, tie_embeddings=True, qkv_bias=True,
                 max_position_embeddings=512),
    "small": dict(vocab_size=2048, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
                  intermediate_size=1024, rope_theta=1_000_000.0, tie_embeddings=True, qkv_bias=True,
                  max_position_embeddings=2048),
    "interplay-100m": dict(vocab_size=2304, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=2,
                           intermediate_size=3072, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                           tie_embeddings=True, qkv_bias=True, max_position_embeddings=2048,
                           dtype="bfloat16"),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                         intermediate_size=4864, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
                         dtype="bfloat16"),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
                         dtype="bfloat16"),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                       intermediate_size=18944, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       tie_embeddings=False, qkv_bias=True, max_position_embeddings=32768,
                       dtype="bfloat16", remat=True),
}


def get_config(name: str = "toy") -> ml_collections.ConfigDict:
  if name not in SIZES:
    import difflib
    close = difflib.get_close_matches(name, SIZES, n=3, cutoff=0.3)
    raise KeyError(f"unknown model size {name!r}; did you mean {close}? Known sizes: {sorted(SIZES)}")
  return ml_collections.ConfigDict(SIZES[name])
