"""Training and evaluation.

    pretrain.py   tokenizer training, data, initialisation, the training loop with exact resume
    evaluate.py   sliding-window perplexity
"""
