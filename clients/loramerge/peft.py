"""The PEFT adapter folder layout that every part of loramerge reads and writes."""

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
