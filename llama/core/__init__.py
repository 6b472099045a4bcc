"""The model itself and what every use of it needs.

    config.py       ModelConfig (one frozen dataclass), the registry of released shapes, Meta/HF configs
    model.py        the Transformer: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU
    tokenizer.py    Llama 3 (tiktoken) and Llama 1/2 (sentencepiece) tokenizers, chat formats
    generation.py   sampling, the prefill/decode loop, the compiled decode step
    speculative.py  speculative decoding with a draft model
    checkpoint.py   Meta / HF checkpoint directories <-> Transformer (file formats live in weights/)
    stops.py        stop strings in streamed text
    device.py       --device / --threads / --dtype choices
"""
