"""Weight quantization, one home: which layers a plan quantizes and the bytes each takes (`plan`),
bitsandbytes (`bnb`), AWQ (`awq`: calibration, layout, kernels; `awq_store`: where a checkpoint's AWQ
weights come from) and the disk cache of quantized weights (`cache`)."""
