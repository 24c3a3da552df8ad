"""GPT-2 from scratch: model, data, one training loop with DDP/FSDP2/DeepSpeed backends."""
