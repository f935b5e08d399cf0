"""GPU memory benchmark per preset, estimate beside measurement, and small-card emulation.

    python benchmarks/memory.py                      # CUDA, full-size random checkpoint, caps 2/4/6 GiB
    python benchmarks/memory.py --presets bnb-4bit --caps ""   # a subset
    python benchmarks/memory.py --dry-run            # CPU, tiny checkpoint: exercises every code path
    python benchmarks/memory.py --layer-errors       # per-layer quantization errors (presets.py table)

Each measurement runs in a fresh child process, so peak statistics, NVML process memory and the CUDA
context belong to that preset alone. Per preset: load (T3 via quant.bnb.load_quantized; S3Gen speech parts,
flow Linears quantized by quantize.quantize_module), a --max-tokens decode with CFG (ignore_stop), S3Gen on
the tokens. Reported: torch peak allocated/reserved per stage and overall, NVML process memory, load time,
T3 tokens/s, S3Gen RTF, the estimate and measured/estimated ratios, and the numbers that calibrate
estimate.py's workspace constants. With --caps, each cap runs the chooser with that much free memory, limits
the allocator (torch.cuda.set_per_process_memory_fraction) to the cap minus the measured CUDA context, and
runs the chosen preset's utterance: it must finish without OOM. JSON goes to stdout and to $OUT/memory.json if
$OUT is set. Pieces that do not exist yet are reported as "unavailable: <reason>".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3
MiB = 1024**2


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


# ---------------------------------------------------------------------------------------------------------
# checkpoint


def ensure_checkpoint(folder: Path, size: str) -> dict:
    """Write the random checkpoint once (a marker file says it is complete)."""
    marker = folder / ".benchmark-complete"
    if marker.exists():
        return {"folder": str(folder), "written_s": 0.0, "reused": True}
    try:
        from chatterbox_cli.testing.checkpoint_writer import write_random_checkpoint
    except ImportError as e:
        return {"status": f"unavailable: checkpoint writer ({_err(e)})"}
    t0 = time.perf_counter()
    write_random_checkpoint(folder, size=size)
    missing = [
        f for f in ("t3_cfg.safetensors", "s3gen.safetensors", "ve.safetensors") if not (folder / f).exists()
    ]
    if missing:
        return {"status": f"unavailable: writer did not produce {missing}", "folder": str(folder)}
    marker.touch()
    return {"folder": str(folder), "written_s": round(time.perf_counter() - t0, 1), "reused": False}


# ---------------------------------------------------------------------------------------------------------
# one measurement (child process)


def make_plan(preset: str, min_params: int | None):
    from chatterbox_cli.presets import plan_for
    from chatterbox_cli.quant.plan import QuantPlan

    plan = plan_for(preset)
    if min_params is None:
        return plan
    return QuantPlan(
        plan.preset, {c: replace(cp, min_params=min_params) for c, cp in plan.components.items()}
    )


class Meter:
    """torch and NVML memory readings on CUDA; no-ops (None) on CPU."""

    def __init__(self, device) -> None:  # noqa: ANN001
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.nvml_peak = 0

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> int | None:
        return self.torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def reserved_peak(self) -> int | None:
        return self.torch.cuda.max_memory_reserved() if self.cuda else None

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def nvml(self) -> int | None:
        if not self.cuda:
            return None
        from chatterbox_cli.estimate import nvml_process_bytes

        used = nvml_process_bytes(self.torch.cuda.current_device(), os.getpid())
        if used is not None:
            self.nvml_peak = max(self.nvml_peak, used)
        return used


def run_stage(res: dict, name: str, meter: Meter, fn):  # noqa: ANN001, ANN201
    """Run one stage, record its time and peak memory, or its failure; returns fn's value or None."""
    import torch

    meter.sync()
    before_peak = meter.peak()
    meter.reset()
    t0 = time.perf_counter()
    stage = {}
    res["stages"][name] = stage
    try:
        out = fn(stage)
        meter.sync()
        stage["seconds"] = round(time.perf_counter() - t0, 3)
        stage["status"] = stage.get("status", "ok")
        return out
    except torch.OutOfMemoryError as e:
        stage["status"] = f"oom: {_err(e)}"
        res["oom"] = True
    except ImportError as e:
        stage["status"] = f"unavailable: {_err(e)}"
    except Exception as e:  # noqa: BLE001 - the benchmark reports every failure and carries on
        stage["status"] = f"error: {_err(e)}"
        stage["traceback"] = traceback.format_exc()[-2000:]
    finally:
        stage["peak_allocated"] = meter.peak()
        stage["allocated_after"] = meter.allocated()
        stage["nvml_process_after"] = meter.nvml()
        if before_peak is not None:
            res["_overall_peak"] = max(res.get("_overall_peak", 0), before_peak, meter.peak() or 0)
    return None


def run_one(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    from chatterbox_cli.estimate import (
        EstimateReport,
        choose,
        estimate_plan,
        measure_cuda_context_bytes,
        read_headers,
    )
    from chatterbox_cli.presets import preset_names, sixteen_bit_dtype

    folder = Path(args.checkpoint)
    device = torch.device(args.device)
    meter = Meter(device)
    res: dict = {"stages": {}, "device": str(device), "cap_gib": args.cap, "pid": os.getpid()}
    if meter.cuda:
        res["gpu"] = torch.cuda.get_device_name()
        res["total_memory"] = torch.cuda.get_device_properties(0).total_memory
    ctx = measure_cuda_context_bytes() if meter.cuda else None
    res["cuda_context_measured"] = ctx
    headers = read_headers(folder)
    est_kwargs = dict(
        max_tokens=args.max_tokens, cfg_weight=0.5, cuda_context_bytes=ctx, text_tokens=args.text_tokens
    )

    preset = args.preset
    if args.cap is not None:
        cap = int(args.cap * GiB)
        ests = {
            p: estimate_plan(headers, make_plan(p, args.min_params), free_bytes=cap, **est_kwargs)
            for p in preset_names()
        }
        report = EstimateReport(cap, ests)
        preset, reason = choose(report)
        res["chooser"] = {
            "chosen": preset,
            "reason": reason,
            "totals": {p: e.total_bytes for p, e in ests.items()},
        }
        if preset is None:
            res["status"] = "chooser picked the CPU; nothing to run on the GPU"
            return res
        if meter.cuda:
            limit = cap - (ctx or 0)
            torch.cuda.set_per_process_memory_fraction(limit / res["total_memory"])
            res["allocator_limit"] = limit
    res["preset"] = preset
    plan = make_plan(preset, args.min_params)
    est = estimate_plan(headers, plan, **est_kwargs)
    res["estimate"] = est.to_dict()
    dtype = sixteen_bit_dtype(device)
    res["dtype"] = str(dtype)
    models: dict = {}

    # The service's own loaders (fused projections, flow in fp16, HiFT in fp32), without the quant cache.
    from chatterbox_cli import service

    decision = service.Decision(device, preset, dtype, "benchmark", None, None)

    def record(stage: dict, q) -> None:  # noqa: ANN001
        if q is not None:
            stage.update(
                quantized_layers=q.quantized_layers,
                quantized_bytes=q.quantized_bytes,
                expected_bytes=q.expected_bytes,
            )

    def load_t3(stage: dict) -> None:
        t3, q, _ = service._load_t3(folder / "t3_cfg.safetensors", decision, plan, False, print)
        record(stage, q)
        models["t3"] = t3

    def load_s3gen(stage: dict) -> None:
        s3, q, _ = service._load_s3gen(folder / "s3gen.safetensors", decision, plan, False, print)
        record(stage, q)
        models["s3gen"] = s3

    def load_conds(stage: dict) -> None:
        from chatterbox_cli.models.conds import load_builtin_conds

        models["conds"] = load_builtin_conds(folder / "conds.pt").to(device, dtype)

    def text_tokens() -> torch.Tensor:
        t3 = models["t3"]
        n = args.text_tokens
        try:
            from chatterbox_cli.models.tokenizer import EnTokenizer

            tok = EnTokenizer(folder / "tokenizer.json")
            sentence = (
                "The quick brown fox jumps over the lazy dog while the memory benchmark keeps counting. "
            )
            ids = tok.text_to_tokens(sentence * 40).flatten()
            inner = ids[1:-1][: n - 2]
            return torch.cat([ids[:1], inner, ids[-1:]])
        except ImportError:
            c = t3.config
            inner = torch.randint(1, c.text_vocab_size, (n - 2,), generator=torch.Generator().manual_seed(0))
            return torch.cat([torch.tensor([c.start_text_token]), inner, torch.tensor([c.stop_text_token])])

    def generate(stage: dict) -> None:
        t3 = models["t3"]
        text = text_tokens()
        stage["text_tokens"] = int(text.numel())
        gen = torch.Generator(device=device).manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens = t3.generate(
                text,
                models["conds"].t3,
                max_new_tokens=args.max_tokens,
                cfg_weight=0.5,
                generator=gen,
                ignore_stop=True,
            )
        meter.sync()
        secs = time.perf_counter() - t0
        stage["tokens"] = int(tokens.numel())
        stage["tokens_per_s"] = round(tokens.numel() / secs, 2)
        models["tokens"] = tokens

    def synthesize(stage: dict) -> None:
        s3 = models["s3gen"]
        tokens = models["tokens"]
        tokens = tokens[tokens < 6561]
        stage["speech_tokens"] = int(tokens.numel())
        t0 = time.perf_counter()
        with torch.inference_mode():
            wav = s3.synthesize(
                tokens[None], models["conds"].gen, generator=torch.Generator(device=device).manual_seed(0)
            )
        meter.sync()
        secs = time.perf_counter() - t0
        audio_s = wav.shape[-1] / 24_000
        stage["audio_s"] = round(audio_s, 2)
        stage["rtf"] = round(secs / audio_s, 4) if audio_s else None
        stage["finite"] = bool(torch.isfinite(wav).all())

    run_stage(res, "load_t3", meter, load_t3)
    res["after_t3_load_allocated"] = meter.allocated()
    if "t3" in models:
        run_stage(res, "load_s3gen", meter, load_s3gen)
    res["weights_allocated"] = meter.allocated()
    if "t3" in models:
        run_stage(res, "conds", meter, load_conds)
    if "conds" in models:
        run_stage(res, "t3_generate", meter, generate)
    if "tokens" in models and "s3gen" in models:
        run_stage(res, "s3gen_synthesize", meter, synthesize)
    res["load_s"] = round(
        sum(res["stages"].get(s, {}).get("seconds", 0) for s in ("load_t3", "load_s3gen")), 2
    )

    peak = res.pop("_overall_peak", None)
    res["peak_allocated"] = peak
    res["peak_reserved"] = meter.reserved_peak()
    res["nvml_process_peak"] = meter.nvml_peak or None
    if meter.cuda and peak:
        est_alloc = est.total_bytes - est.cuda_context_bytes - est.margin_bytes
        res["estimate_allocated"] = est_alloc
        res["ratio_peak_over_estimate"] = round(peak / est_alloc, 3)
        if res["nvml_process_peak"]:
            res["ratio_nvml_over_estimate_total_minus_margin"] = round(
                res["nvml_process_peak"] / (est.total_bytes - est.margin_bytes), 3
            )
            res["context_after_run"] = res["nvml_process_peak"] - (res["peak_reserved"] or 0)
        weights = res.get("weights_allocated") or 0
        t3_peak = res["stages"].get("t3_generate", {}).get("peak_allocated")
        s3_peak = res["stages"].get("s3gen_synthesize", {}).get("peak_allocated")
        res["calibration"] = {
            "weights_measured": weights,
            "weights_estimated": est.components["t3"].weights_bytes + est.components["s3gen"].weights_bytes,
            "kv_cache_estimated": est.kv_cache_bytes,
            "t3_workspace_measured": None if t3_peak is None else t3_peak - weights - est.kv_cache_bytes,
            "t3_workspace_formula": est.details["t3_workspace_bytes"],
            "s3gen_workspace_measured": None if s3_peak is None else s3_peak - weights,
            "s3gen_workspace_formula": est.details["s3gen_workspace_bytes"],
        }
    failed = [k for k, v in res["stages"].items() if v.get("status") != "ok"]
    res["status"] = "ok" if not failed else f"incomplete: {', '.join(failed)}"
    res.setdefault("oom", False)
    return res


# ---------------------------------------------------------------------------------------------------------
# per-layer quantization error (the table in presets.py)


def layer_errors(device_name: str) -> dict:
    import torch

    from chatterbox_cli.quant.bnb import make_quantized_linear, require_bitsandbytes
    from chatterbox_cli.quant.plan import ComponentPlan

    torch.set_grad_enabled(False)
    device = torch.device(device_name)
    bnb = require_bitsandbytes(device)
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "t3 q/k/v/o": (1024, 1024),
        "t3 gate/up": (4096, 1024),
        "t3 down": (1024, 4096),
        "t3 speech_head": (8194, 1024),
        "t3 text_head": (704, 1024),
        "t3 cond_enc.spkr_enc": (1024, 256),
        "t3 cond_enc.emotion_adv_fc": (1024, 1),
        "flow.encoder attn": (512, 512),
        "flow.encoder ff w_1": (2048, 512),
        "flow.decoder attn q/k/v": (512, 256),
        "flow.decoder ff": (256, 1024),
        "flow.encoder_proj": (80, 512),
    }

    def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
        return round(float((y.float().cpu() - ref).norm() / ref.norm()), 5)

    def layer(w: torch.Tensor, mode: str, threshold: float = 0.0):  # noqa: ANN202
        cp = ComponentPlan("t3", mode, ("*",), (), 0, 0, threshold)  # type: ignore[arg-type]
        return make_quantized_linear(bnb, w, None, cp, device, torch.bfloat16)

    out: dict = {
        "device": device_name,
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "layers": {},
    }
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i, generator=gen) * 0.02
        x = torch.randn(32, i, generator=gen)
        xo = x.clone()
        xo[:, : max(1, i // 100)] *= 20  # 1 % outlier features
        ref, refo = x @ w.T, xo @ w.T
        xd, xod = x.to(device, torch.bfloat16), xo.to(device, torch.bfloat16)
        row: dict = {"bf16": rel(xd @ w.to(device, torch.bfloat16).T, ref)}
        cases = (
            ("nf4", "nf4", 0.0, xd, ref),
            ("int8", "int8", 0.0, xd, ref),
            ("int8_outliers_thr0", "int8", 0.0, xod, refo),
            ("int8_outliers_thr6", "int8", 6.0, xod, refo),
        )
        for key, mode, threshold, inp, target in cases:
            try:
                row[key] = rel(layer(w, mode, threshold)(inp), target)
            except (AssertionError, RuntimeError) as e:
                row[key] = f"error: {_err(e)}"
        out["layers"][f"{name} {o}x{i}"] = row
    heads = {}
    for name, (o, i) in (("speech_head", (8194, 1024)), ("text_head", (704, 1024))):
        w = torch.randn(o, i, generator=gen) * 0.02
        x = torch.randn(64, i, generator=gen)
        ref = x @ w.T
        scale = 2.0 / ref.std()
        ref = ref * scale
        xd = x.to(device, torch.bfloat16)
        for mode in ("bf16", "int8", "nf4"):
            if mode == "bf16":
                y = (xd @ w.to(device, torch.bfloat16).T).float().cpu() * scale
            else:
                lay = layer(w, mode)
                if device.type == "cpu":
                    lay.train()  # bitsandbytes' CPU nf4 inference path needs out_features % 32 == 0
                y = lay(xd).float().cpu() * scale
            p, q = torch.log_softmax(ref / 0.8, -1), torch.log_softmax(y / 0.8, -1)
            heads[f"{name} {mode}"] = {
                "kl_nats_T0.8": round(float((p.exp() * (p - q)).sum(-1).mean()), 5),
                "top1_agreement": round(float((ref.argmax(-1) == y.argmax(-1)).float().mean()), 3),
            }
    out["heads"] = heads
    return out


# ---------------------------------------------------------------------------------------------------------
# parent


def child(args: argparse.Namespace, extra: list[str], timeout: float) -> dict:
    cmd = [
        sys.executable, __file__, "--one", "--checkpoint", str(args.checkpoint), "--device", args.device,
        "--max-tokens", str(args.max_tokens), "--text-tokens", str(args.text_tokens), *extra,
    ]  # fmt: skip
    if args.min_params is not None:
        cmd += ["--min-params", str(args.min_params)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s", "args": extra}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "status": f"child failed (exit {proc.returncode})",
            "args": extra,
            "stderr": proc.stderr[-3000:],
        }
    out = json.loads(lines[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        st = r.get("stages", {})
        rows.append(
            {
                "preset": r.get("preset"),
                "cap_gib": r.get("cap_gib"),
                "status": r.get("status"),
                "peak_allocated_gib": None
                if not r.get("peak_allocated")
                else round(r["peak_allocated"] / GiB, 3),
                "nvml_process_gib": None
                if not r.get("nvml_process_peak")
                else round(r["nvml_process_peak"] / GiB, 3),
                "estimate_total_gib": round(r["estimate"]["total_bytes"] / GiB, 3)
                if "estimate" in r
                else None,
                "ratio_peak_over_estimate": r.get("ratio_peak_over_estimate"),
                "load_s": r.get("load_s"),
                "t3_tokens_per_s": st.get("t3_generate", {}).get("tokens_per_s"),
                "s3gen_rtf": st.get("s3gen_synthesize", {}).get("rtf"),
                "oom": r.get("oom"),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny checkpoint, few tokens")
    ap.add_argument("--layer-errors", action="store_true")
    ap.add_argument("--presets", default="fp16,bnb-8bit,bnb-4bit")
    ap.add_argument("--caps", default="2,4,6", help="GiB caps to emulate, comma separated ('' for none)")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--text-tokens", type=int, default=None)
    ap.add_argument("--checkpoint", default=None, help="folder of a random checkpoint (written if absent)")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--min-params", type=int, default=None, help="override the plans' size rule (dry run: 1024)"
    )
    ap.add_argument("--budget-s", type=float, default=560.0, help="stop starting children after this")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    if args.one:
        torch.set_num_threads(min(8, torch.get_num_threads()))
        print(json.dumps(run_one(args)), flush=True)
        return
    if args.layer_errors:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(1 if dev == "cpu" else torch.get_num_threads())
        print(json.dumps(layer_errors(dev), indent=1))
        return

    t_start = time.perf_counter()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print(json.dumps({"status": "unavailable: no CUDA GPU; use --dry-run on a CPU"}))
        sys.exit(1)
    args.device = args.device or ("cpu" if dry else "cuda")
    args.max_tokens = args.max_tokens or (24 if dry else 1000)
    args.text_tokens = args.text_tokens or (40 if dry else 300)
    if dry and args.min_params is None:
        args.min_params = (
            1024  # tiny layers would all fall under the size rule; quantize them to test the paths
        )
    size = "tiny" if dry else "full"
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    args.checkpoint = Path(args.checkpoint or tmp / f"chatterbox_bench_ckpt_{size}")
    result: dict = {
        "benchmark": "memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry,
        "device": args.device,
        "gpu": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device.startswith("cuda")
        else None,
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "text_tokens": args.text_tokens,
        "min_params_override": args.min_params,
    }
    try:
        import bitsandbytes

        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as e:
        result["bitsandbytes"] = f"unavailable: {_err(e)}"
    ckpt = ensure_checkpoint(args.checkpoint, size)
    result["checkpoint"] = ckpt
    runs, caps = [], []
    if "status" not in ckpt:
        for preset in filter(None, args.presets.split(",")):
            left = args.budget_s - (time.perf_counter() - t_start)
            runs.append(
                child(args, ["--preset", preset], left)
                if left > 5
                else {"preset": preset, "status": "skipped: budget"}
            )
        for cap in filter(None, args.caps.split(",")):
            left = args.budget_s - (time.perf_counter() - t_start)
            caps.append(
                child(args, ["--cap", cap], left)
                if left > 5
                else {"cap_gib": float(cap), "status": "skipped: budget"}
            )
    result["runs"] = runs
    result["caps"] = caps
    result["summary"] = summary_rows(runs + caps)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory.json").write_text(text)


if __name__ == "__main__":
    main()
