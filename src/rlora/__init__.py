"""rlora: R-LoRA, HydraLoRA and LoRA for multi-task fine-tuning, the PEFT way."""
