"""Weight quantization, one home: bitsandbytes (`bnb`), AWQ (`awq`) and the disk cache of quantized weights
(`cache`). Which layers a preset quantizes, and the bytes each takes, are in presets.py and estimate.py."""
