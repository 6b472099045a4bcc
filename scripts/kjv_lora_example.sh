#!/usr/bin/env bash
# The fine-tuning walkthrough of the README, end to end: a LoRA adapter for the bundled model
# (weights/kjv) that answers two kinds of questions about a verse, scored by exact match on held-out
# verses before and after. Writes weights/kjv-lora/ (the adapter, its loss curve and summary,
# exact_match_before.json / exact_match_after.json, base_model.sha256: the base it was trained on).
# About 5 CPU minutes on one thread (15 on a busy machine).
#
#     bash scripts/kjv_lora_example.sh            # work files in data/
#     bash scripts/kjv_lora_example.sh /tmp/work  # or elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-data}"
out=weights/kjv-lora
threads="${THREADS:-1}"  # one thread: on a shared machine more threads wait for each other

# 1. The corpus (the bundled model's training text) and the instruction set made from it.
[ -f "$work/kjv/train.txt" ] || python scripts/prepare_kjv.py --out "$work/kjv"
python scripts/make_kjv_instructions.py --kjv "$work/kjv" --out "$work/kjv-instruct" --seed 0

# 2. Exact match of the bundled model alone on the held-out items.
python scripts/exact_match.py --data "$work/kjv-instruct/test.jsonl" --threads "$threads" \
    --json "$work/exact_match_before.json"

# 3. Train the adapter: rank 8 on the seven projections of every block, 400 steps of 16 examples.
rm -rf "$work/kjv-lora-run"
python scripts/finetune.py --checkpoint weights/kjv \
    --data "$work/kjv-instruct/train.jsonl" --valid "$work/kjv-instruct/valid.jsonl" --out "$work/kjv-lora-run" \
    --method lora --lora-rank 8 --max-steps 400 --batch-size 16 --lr 2e-3 \
    --eval-every 50 --eval-batches 4 --seed 0 --threads "$threads" --no-progress

# 4. Exact match with the adapter, on the same held-out items.
python scripts/exact_match.py --data "$work/kjv-instruct/test.jsonl" --adapter "$work/kjv-lora-run" \
    --threads "$threads" --json "$work/exact_match_after.json"

# 5. What ships: the adapter (peft layout), its loss curve and summary, both scores.
mkdir -p "$out"
cp "$work/kjv-lora-run"/{adapter_config.json,adapter_model.safetensors,loss.png,train_summary.json} "$out"/
cp "$work/exact_match_before.json" "$work/exact_match_after.json" "$out"/
# The base it belongs to: an adapter only means something on the weights it was trained with
# (tests/test_finetune_script.py checks the bundled model still is that base).
(cd weights/kjv && sha256sum model.safetensors) > "$out/base_model.sha256"
echo "wrote $out" >&2
