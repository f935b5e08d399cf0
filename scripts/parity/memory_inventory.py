"""Write tests/fixtures/official_tensor_inventory.json.gz: every tensor name and shape of the reference
implementation's T3, S3Gen and VoiceEncoder (the official checkpoint layout), with the type of the module
that owns it. Built on the meta device, so no weights are needed. Run with the reference environment:

    /work/refenv/bin/python scripts/parity/memory_inventory.py
"""

import gzip
import json
from pathlib import Path

import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.t3 import T3
from chatterbox.models.voice_encoder import VoiceEncoder

OUT = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official_tensor_inventory.json.gz"


def inventory(model: torch.nn.Module) -> dict[str, list]:
    owner_type = {}
    for mod_name, mod in model.named_modules():
        for tensor_name, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            full = f"{mod_name}.{tensor_name}" if mod_name else tensor_name
            kind = "Linear" if isinstance(mod, torch.nn.Linear) else type(mod).__name__
            owner_type[full] = kind
    return {n: [list(t.shape), owner_type.get(n, "?")] for n, t in model.state_dict().items()}


def main() -> None:
    with torch.device("meta"):
        models = {"t3_cfg.safetensors": T3(), "s3gen.safetensors": S3Gen(), "ve.safetensors": VoiceEncoder()}
    data = {file: inventory(m) for file, m in models.items()}
    with gzip.open(OUT, "wb", compresslevel=9) as f:
        f.write(json.dumps(data, separators=(",", ":")).encode())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
