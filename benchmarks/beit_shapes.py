"""The BEiT shapes the benchmarks measure, as ``BeitConfig`` fields (one table for all of them).

base: microsoft/beit-base-patch16-224-pt22k-ft22k (per-layer relative position bias); large: the
study's microsoft/beit-large-patch16-224-pt22k (shared bias, layer scale 0.1); tiny: for CPU
rehearsals. Kept free of imports so that any benchmark can use it on a bare GPU machine.
"""

MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 use_relative_position_bias=True),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 use_relative_position_bias=True, layer_scale_init_value=0.1),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  use_shared_relative_position_bias=True, layer_scale_init_value=0.1),
}
