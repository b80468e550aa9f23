"""Fine-tuning on quantized bases (QLoRA)."""
