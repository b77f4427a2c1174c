"""Model shapes by name, in plain Python: one source for the model and the planner.

`ringwise.model` builds a ModelConfig from each, `ringwise.plan` a ModelShape from the
LLaMA ones; the planner runs without torch, so this module imports nothing.
Keys are ModelConfig's field names.
"""

_LLAMA_VOCAB = 32000

SHAPES: dict[str, dict[str, int]] = {
    # small models for tests and CPU runs (the ModelConfig default vocabulary)
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192),
    "small": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384),
    "base": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768),
    # LLaMA (3B: OpenLLaMA's shapes), the paper's models
    "llama-3b": dict(vocab_size=_LLAMA_VOCAB, dim=3200, n_layers=26, n_heads=32, n_kv_heads=32, ffn_dim=8640),
    "llama-7b": dict(vocab_size=_LLAMA_VOCAB, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008),
    "llama-13b": dict(vocab_size=_LLAMA_VOCAB, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-30b": dict(vocab_size=_LLAMA_VOCAB, dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, ffn_dim=17920),
    "llama-65b": dict(vocab_size=_LLAMA_VOCAB, dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, ffn_dim=22016),
}

LLAMA = tuple(name for name in SHAPES if name.startswith("llama-"))
