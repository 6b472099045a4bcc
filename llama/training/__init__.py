"""Training and evaluation.

    pretrain.py   tokenizer training, data, initialisation, the training loop with exact resume
    evaluate.py   sliding-window perplexity
    long_context.py   loss by position (context extension), logits through a quantized KV cache
"""
