"""Training and evaluation.

    loop.py       the training loop (optimiser, schedule, accumulation, clipping, validation, exact resume),
                  shared by pretraining and fine-tuning
    pretrain.py   tokenizer training, pretraining data (token windows), initialisation
    finetune.py   fine-tuning a checkpoint: full, LoRA, QLoRA; activation checkpointing
    lora.py       LoRA adapters: wrap, merge, switch, per-row adapters, peft's file layout
    data.py       instruction / chat / text records -> tokens with the loss on the answers; batching
    evaluate.py   sliding-window perplexity
"""
