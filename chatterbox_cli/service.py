"""The one model-loading service: probe → estimate → choose → load, and the OOM step-down.

Every command goes through here: `probe-vram` and `estimate` call `decide` (no weights read),
`synthesize` holds its model in a `ModelHolder` (load, voice, warm-up, speak, and the step-down on CUDA
out-of-memory). Each decision comes with a one-line reason that the CLI prints as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

# NVML numbers GPUs in PCI bus order; make CUDA agree before anything initialises it.
os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
# cuBLAS(Lt) workspaces come from torch's allocator, one per stream that runs a matmul (decoding, CUDA-graph
# capture); 4 MiB each instead of the larger Hopper defaults (measured in benchmarks/memory.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:1")
os.environ.setdefault("TORCH_CUBLASLT_WORKSPACE_SIZE", "4096")  # KiB

import torch  # noqa: E402

from chatterbox_cli import estimate, oom, presets, vram  # noqa: E402
from chatterbox_cli.audio import fade_edges, not_a_file  # noqa: E402
from chatterbox_cli.checkpoint import (  # noqa: E402
    DEFAULT_REPO,
    Checkpoint,
    resolve_checkpoint,
    safetensors_header,
    validate,
)
from chatterbox_cli.errors import ChatterboxError, OutOfMemoryError, UsageError  # noqa: E402
from chatterbox_cli.quant.plan import QuantPlan, parse_plan_spec  # noqa: E402
from chatterbox_cli.turns import Turns  # noqa: E402
from chatterbox_cli.variants import Variant, get_variant  # noqa: E402

if TYPE_CHECKING:
    from chatterbox_cli.models.conds import Conditionals
    from chatterbox_cli.models.s3gen import S3Gen
    from chatterbox_cli.models.t3 import T3
    from chatterbox_cli.models.tokenizer import CheckpointTokenizer
    from chatterbox_cli.pipeline import AudioChunk, ChunkRow, SynthesisSettings
    from chatterbox_cli.quant.bnb import QuantReport

Notify = Callable[[str], None]

CPU_PRESET = "fp32"  # what runs on the CPU when no preset is forced: the checkpoint's own precision


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class LoadRequest:
    model: str = DEFAULT_REPO
    revision: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    preset: str = "auto"  # auto | fp16 | bnb-8bit | bnb-4bit
    plan: str | None = None  # per-component overrides, e.g. "t3=nf4,flow=int8"
    variant: str | None = None  # english | multilingual | turbo; None: a local folder's, else English
    max_tokens: int = 1000
    batch: int = 1  # chunks decoded together; 0: as many as free GPU memory allows (AUTO_BATCH_LIMIT)
    cfg_weight: float | None = None  # None: the variant's (English 0.5; Turbo has no guidance)
    allow_download: bool = True
    fallback: bool = True
    quant_cache: bool = True  # reuse / write quantized weights under quant_cache.quantized_dir()


@dataclass
class Decision:
    device: torch.device
    preset: str
    dtype: torch.dtype
    reason: str
    free_bytes: int | None
    report: estimate.EstimateReport | None


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    decision: Decision
    t3: T3
    s3gen: S3Gen  # flow + mel2wav; the voice-preparation parts are loaded only when needed
    tokenizer: CheckpointTokenizer
    builtin_voice: Conditionals | None
    load_seconds: float
    quant: dict[str, QuantReport] = field(default_factory=dict)
    quant_cache: dict[str, str] = field(default_factory=dict)  # component -> "hit" | "miss" | "off"
    turns: Turns | None = None  # T3 and S3Gen's weight arena, when they take turns (see `use`)

    @property
    def variant(self) -> Variant:
        return self.checkpoint.variant

    @property
    def device(self) -> torch.device:
        return self.decision.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decision.dtype

    @property
    def preset(self) -> str:
        return self.decision.preset

    @property
    def flow_dtype(self) -> torch.dtype:
        return flow_dtype(self.decision)

    @property
    def takes_turns(self) -> bool:
        """T3 and S3Gen take turns on the GPU (presets.Preset.take_turns); see `use`."""
        return takes_turns(self.decision)

    @property
    def early_tokens(self) -> int:
        """Speech tokens of the first chunk rendered early (presets.Preset.early_tokens); 0 on the CPU, where
        that extra rendering would cost more than it brings forward."""
        preset = presets.PRESETS.get(self.decision.preset)
        return preset.early_tokens if preset is not None and self.device.type == "cuda" else 0

    @property
    def turn(self) -> str | None:
        """Which part has the GPU, when the model takes turns; else None."""
        return self.turns.turn if self.turns is not None else None

    def use(self, part: str) -> None:
        """Give `part` ("t3" or "s3gen") its turn on the GPU, when the model takes turns (turns.Turns: one
        copy from pinned host memory into the weight arena); otherwise both stay where they are."""
        if self.turns is not None:
            self.turns.use(part)

    @functools.cached_property
    def t3_shape(self) -> estimate.T3Shape:
        """T3's dimensions as the estimate counts them, from the checkpoint header (read once)."""
        return estimate.t3_shape(safetensors_header(self.checkpoint.file("t3")))


# --- deciding --------------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """`auto` is the first CUDA GPU when torch can use one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec} asked for a GPU, but this torch build or machine has none "
                f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch"
            )
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def resolve(request: LoadRequest) -> Checkpoint:
    variant = get_variant(request.variant) if request.variant is not None else None
    checkpoint = resolve_checkpoint(
        request.model, request.revision, allow_download=request.allow_download, variant=variant
    )
    validate(checkpoint)
    return checkpoint


def cfg_weight(request: LoadRequest, variant: Variant) -> float:
    """The guidance weight a run decodes with: the request's, else the variant's; 0 where the variant has
    no guidance (its decoding then has no unconditional rows to count)."""
    g = variant.generation
    if "cfg_weight" in g.ignored:
        return 0.0
    return g.cfg_weight if request.cfg_weight is None else request.cfg_weight


def _overrides(request: LoadRequest) -> dict[str, str] | None:
    return parse_plan_spec(request.plan) if request.plan else None


def _estimate(
    request: LoadRequest, checkpoint: Checkpoint, preset: str, free: int | None, context: int | None = None
) -> estimate.EstimateReport:
    return estimate.estimate(
        checkpoint.folder,
        preset,
        max_tokens=request.max_tokens,
        batch=max(1, request.batch),  # auto batch (0) adapts to what is left after loading
        cfg_weight=cfg_weight(request, checkpoint.variant),
        free_bytes=free,
        cuda_context_bytes=context,
        overrides=_overrides(request),
        variant=checkpoint.variant,
    )


def decide(request: LoadRequest, checkpoint: Checkpoint | None = None) -> Decision:
    """Where and how to load, from NVML's free memory and the estimates. Reads no weights."""
    checkpoint = checkpoint or resolve(request)
    device = resolve_device(request.device)
    forced = request.preset != "auto"
    if forced:
        presets.get_preset(request.preset)  # unknown or unavailable presets are usage errors

    if device.type == "cpu":
        why = "--device cpu" if request.device == "cpu" else "no usable GPU"
        if not forced:
            if request.plan:  # it would change nothing: the CPU's default is the checkpoint's own fp32
                raise UsageError(
                    f"--plan changes a preset's components, and on the CPU ({why}) none is chosen: it "
                    "runs the checkpoint's fp32. Name the preset to change: "
                    f"--preset bnb-4bit --plan {request.plan}"
                )
            return Decision(
                device, CPU_PRESET, torch.float32, f"{why}: running on the CPU ({CPU_PRESET})", None, None
            )
        report = _estimate(request, checkpoint, request.preset, None)
        dtype = presets.sixteen_bit_dtype(device)
        return Decision(
            device, request.preset, dtype, f"{why}: running {request.preset} on the CPU", None, report
        )

    index = device.index or 0
    initialized = torch.cuda.is_initialized()
    free = vram.free_bytes(index)
    # The CUDA context is measured (it is 0.3-0.8 GB, by GPU and driver): CUDA starts here, not at loading.
    context = estimate.measure_cuda_context_bytes(index)
    if initialized and free is not None and context is not None:
        free += context  # NVML's free memory already lacks this process's context; the estimate counts it
    if context is not None:
        context += estimate.CUDA_LIBRARIES_BYTES
    dtype = presets.sixteen_bit_dtype(device)
    if forced:
        report = _estimate(request, checkpoint, request.preset, free, context)
        est = report.presets[request.preset]
        if est.fits is False:
            reason = (
                f"--preset {request.preset} needs about {vram.gib(est.total_bytes)} but "
                f"{vram.gib(free or 0)} is free; trying it anyway"
            )
        else:
            reason = f"--preset {request.preset} as asked"
        return Decision(device, request.preset, dtype, reason, free, report)

    if free is None:
        # torch sees a GPU that NVML cannot read (no NVML library): take the smallest footprint.
        report = _estimate(request, checkpoint, "all", None)
        smallest = presets.preset_names()[-1]
        reason = f"NVML cannot read free memory on {device}; using the smallest preset, {smallest}"
        return Decision(device, smallest, dtype, reason, None, report)
    chosen, reason, report = auto_pick(request, checkpoint, free, context)
    if chosen == CPU_PRESET:
        return Decision(torch.device("cpu"), CPU_PRESET, torch.float32, reason, free, report)
    return Decision(device, chosen, dtype, reason, free, report)


def auto_pick(
    request: LoadRequest, checkpoint: Checkpoint, free: int, context: int | None = None
) -> tuple[str, str, estimate.EstimateReport]:
    """What `--preset auto` picks on a GPU with `free` bytes free: a preset, or CPU_PRESET when none fits
    (then synthesis runs on the CPU), with its one-line reason and the estimates. `context`: the measured
    CUDA context (None: the estimate's default). Reads no weights."""
    report = _estimate(request, checkpoint, "all", free, context)
    if report.chosen is None:
        return CPU_PRESET, f"{report.reason}: running on the CPU", report
    return report.chosen, report.reason, report


def lower_presets(preset: str, checkpoint: Checkpoint) -> list[str]:
    """The presets below `preset` (less memory), in step-down order. AWQ counts only where its weights
    exist: a step-down never starts a calibration."""
    from chatterbox_cli.quant import awq_store

    names = presets.preset_names()
    lower = names[names.index(preset) + 1 :] if preset in names else []
    if "awq" in lower and awq_store.find(checkpoint.folder, checkpoint.file("t3")) is None:
        lower.remove("awq")
    return lower


def next_preset(preset: str, checkpoint: Checkpoint) -> str | None:
    """The next preset down, for the OOM step-down; None when there is none."""
    lower = lower_presets(preset, checkpoint)
    return lower[0] if lower else None


# --- loading ---------------------------------------------------------------------------------------------


def takes_turns(decision: Decision) -> bool:
    """Whether the decided preset has T3 and S3Gen take turns on the GPU (none to take on the CPU)."""
    preset = presets.PRESETS.get(decision.preset)
    return preset is not None and preset.take_turns and decision.device.type == "cuda"


def flow_dtype(decision: Decision) -> torch.dtype:
    """The S3Gen flow's dtype: fp16 on a GPU (whatever T3 uses: its mel is 5x closer to fp32 than bf16's,
    0.65 % against 3.1 % relative error on the H100), the checkpoint's fp32 on the CPU."""
    return torch.float16 if decision.dtype != torch.float32 else torch.float32


def _load_t3(
    checkpoint: Checkpoint,
    decision: Decision,
    plan: QuantPlan | None,
    use_cache: bool,
    notify: Notify,
) -> tuple[T3, QuantReport | None, str | None]:
    from chatterbox_cli.checkpoint import safetensors_header
    from chatterbox_cli.models.loading import infer_t3_config, load_module_from_safetensors
    from chatterbox_cli.models.t3 import T3

    path = checkpoint.file("t3")
    config = infer_t3_config(safetensors_header(path))
    with torch.device("meta"):
        t3 = T3(config)
    t3.drop_text_head()
    report, cache = None, None
    if plan is not None and plan["t3"].mode == "awq":
        from chatterbox_cli.quant import awq_store

        awq_file, cache = awq_store.ensure(checkpoint, decision.device, use_cache, notify)
        report = awq_store.load_t3_awq(t3, path, awq_file, decision.device, decision.dtype)
        kernels = ", ".join(f"{n} on {k}" for k, n in report.by_mode.items() if k != "awq")
        notify(f"AWQ T3: {report.quantized_layers} layers ({kernels}) from {awq_file}")
        if cache == "off":
            shutil.rmtree(awq_file.parent, ignore_errors=True)
    elif plan is not None and plan["t3"].quantized:
        from chatterbox_cli.quant.cache import load_quantized_cached

        done = load_quantized_cached(
            t3, path, plan["t3"], decision.device, decision.dtype, use_cache=use_cache, notify=notify
        )
        report, cache = done.report, done.cache
    else:
        t3 = load_module_from_safetensors(t3, path, decision.device, decision.dtype)
        t3.tfmr.fuse_projections()
    if decision.device.type == "cuda":
        t3.keep_text_table_on_host()
    return t3, report, cache


def _load_s3gen(
    path: Path, decision: Decision, plan: QuantPlan | None, use_cache: bool, notify: Notify
) -> tuple[S3Gen, QuantReport | None, str | None]:
    from chatterbox_cli.models.s3gen import S3Gen

    cache = None
    device, dtype = decision.device, flow_dtype(decision)
    if plan is None or not plan["flow"].quantized:
        s3gen = S3Gen.load(path, device, dtype)
        report = None
    else:
        from chatterbox_cli.quant.bnb import verify_quantized
        from chatterbox_cli.quant.cache import quantize_module_cached

        # The flow is built at 16 bits on the host, then its Linears are quantized onto the device one by one
        # (or taken from the cache: S3Gen.load still reads their float weights, but nothing is quantized).
        s3gen = S3Gen.load(path, "cpu", dtype)
        cache = quantize_module_cached(
            s3gen.flow, path, plan["flow"], device, dtype, "flow.", use_cache=use_cache, notify=notify
        ).cache
        s3gen.to(device)
        report = verify_quantized(s3gen.flow, [plan["flow"]], device, prefix="flow.")
    s3gen.mel2wav.float()  # HiFT stays fp32: in 16 bits its waveform is off by 33-71 % (benchmarks/speed.py)
    preset = presets.PRESETS.get(decision.preset)
    if preset is not None and preset.park_vocoder and device.type == "cuda":
        s3gen.park_vocoder(device)
    return s3gen, report, cache


def load_decided(
    checkpoint: Checkpoint, decision: Decision, request: LoadRequest, notify: Notify = _quiet
) -> LoadedModel:
    from chatterbox_cli.models.conds import load_builtin_conds
    from chatterbox_cli.models.tokenizer import open_tokenizer

    start = time.perf_counter()
    plan = None if decision.preset == CPU_PRESET else presets.plan_for(decision.preset, _overrides(request))
    use_cache = request.quant_cache
    s3gen, flow_report, flow_cache = _load_s3gen(checkpoint.file("s3gen"), decision, plan, use_cache, notify)
    turns = Turns(decision.device) if takes_turns(decision) else None
    if turns is not None:
        turns.add("s3gen", s3gen)  # to host memory, before T3 loads: the GPU never holds both
    t3, t3_report, t3_cache = _load_t3(checkpoint, decision, plan, use_cache, notify)
    if checkpoint.variant.alignment_guard:
        from chatterbox_cli.models.alignment import alignment_heads

        t3.alignment_heads = alignment_heads(t3.config.n_layers, t3.config.n_heads)
    tokenizer = open_tokenizer(checkpoint.variant.tokenizer, checkpoint.file("tokenizer"))
    conds_path = checkpoint.file("conds")
    builtin = load_builtin_conds(conds_path) if conds_path.exists() else None
    if turns is not None:
        turns.add("t3", t3)
        turns.use("t3")
    if decision.device.type == "cuda":
        torch.cuda.synchronize(decision.device)
    quant = {k: v for k, v in (("t3", t3_report), ("flow", flow_report)) if v is not None}
    cached = {k: v for k, v in (("t3", t3_cache), ("flow", flow_cache)) if v is not None}
    seconds = time.perf_counter() - start
    return LoadedModel(checkpoint, decision, t3, s3gen, tokenizer, builtin, seconds, quant, cached, turns)


def load(request: LoadRequest, notify: Notify = _quiet) -> LoadedModel:
    """Resolve the checkpoint, decide and load, stepping down on CUDA out-of-memory (see ModelHolder)."""
    return ModelHolder(request, notify).model


# --- voices --------------------------------------------------------------------------------------------


def _model_key(checkpoint: Checkpoint) -> str:
    """Names the weights that prepare a voice, so a cached voice is reused only with the same weights."""
    if checkpoint.repo_id and checkpoint.revision:
        return f"{checkpoint.repo_id}@{checkpoint.revision}"
    parts = []
    for role in ("ve", "s3gen"):
        path = checkpoint.file(role)
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{checkpoint.folder.resolve()}|{'|'.join(parts)}"


def voice(
    model: LoadedModel,
    source: str | None,
    exaggeration: float,
    notify: Notify = _quiet,
    device: torch.device | None = None,
) -> Conditionals:
    """Conditionals for `source`, on the CPU in fp32 (the pipeline moves them to the model): None → the
    checkpoint's built-in voice; `*.voice` → a saved voice file; a name that is no file → the voice
    library's (voice_library.py); anything else → an audio clip, prepared once (on `device`, default the
    model's) and cached by content. Voice-preparation parts are loaded for the clip and freed right
    after."""
    from chatterbox_cli import voice_library
    from chatterbox_cli.models.conds import Conditionals, T3Cond, load_voice

    if source is None:
        if model.builtin_voice is None:
            raise UsageError(
                f"{model.checkpoint.folder} has no built-in voice (conds.pt); give one with --voice clip.wav"
            )
        conds = model.builtin_voice
    elif source.endswith(".voice"):
        conds, _ = load_voice(Path(source))
    elif voice_library.is_name(source) and not Path(source).exists():
        conds, _ = load_voice(voice_library.find(source))
    else:
        conds = _voice_from_clip(model, Path(source), exaggeration, notify, device or model.device)
    emotion = torch.full_like(conds.t3.emotion_adv, float(exaggeration))
    conds = Conditionals(T3Cond(conds.t3.speaker_emb, conds.t3.cond_prompt_speech_tokens, emotion), conds.gen)
    return conds.to("cpu", torch.float32)


def add_library_voice(
    request: LoadRequest, name: str, clip: str, force: bool, notify: Notify = _quiet
) -> Path:
    """Prepare `clip` with the model `request` names, as `synthesize --voice clip` would, and keep it in the
    voice library as `name`; returns its file."""
    from chatterbox_cli import __version__, voice_library
    from chatterbox_cli.models.conds import save_voice

    path = voice_library.path_of(name)
    if path.exists() and not force:
        raise UsageError(f"the voice library already has {name!r} ({path}); pass --force to replace it")
    if (problem := not_a_file(clip)) is not None:
        raise UsageError(f"{clip} {problem}; give the path of an audio clip of the voice")
    holder = ModelHolder(request, notify)
    conds = holder.voice(clip, 0.5)  # the run's exaggeration replaces it when the voice is used
    model = holder.model
    metadata = {
        "name": name,
        "source_name": Path(clip).name,
        "model": _model_key(model.checkpoint),
        "variant": model.variant.name,
        "created_by": f"chatterbox-cli {__version__}",
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_voice(path, conds, metadata)
    except OSError as e:
        raise ChatterboxError(
            f"could not write {path}: {e.strerror or e}; check the folder (CHATTERBOX_VOICES)"
        ) from e


def _voice_from_clip(
    model: LoadedModel, clip: Path, exaggeration: float, notify: Notify, device: torch.device
) -> Conditionals:
    from chatterbox_cli.models.conds import load_voice
    from chatterbox_cli.models.s3gen import S3Gen
    from chatterbox_cli.models.s3gen.s3gen import VOICE_PARTS
    from chatterbox_cli.models.voice_encoder import load_voice_encoder
    from chatterbox_cli.voice import file_sha256, voice_cache_path, voice_from_clip

    if (problem := not_a_file(clip)) is not None:
        raise UsageError(f"{clip} {problem}; give an audio file to --voice")
    key = _model_key(model.checkpoint)
    cached = voice_cache_path(file_sha256(clip), key)
    if cached.is_file():
        try:
            return load_voice(cached)[0]
        except ChatterboxError as e:
            notify(f"the cached voice {cached} is damaged ({e}); preparing it again")
    notify(f"preparing the voice from {clip.name} (cached for next time)")
    # Preparation runs in fp32: it happens once per clip and its outputs are cached. Its parts are
    # dropped when this frame ends, also when it ends in an error (the caller then releases their memory).
    ve = load_voice_encoder(model.checkpoint.file("ve"), device, torch.float32)
    prep = S3Gen.load(model.checkpoint.file("s3gen"), device, torch.float32, parts=VOICE_PARTS)
    prepared = voice_from_clip(
        clip,
        ve,
        prep,
        exaggeration=exaggeration,
        model_key=key,
        rules=model.variant.voice,
        prompt_tokens=model.t3.config.speech_cond_prompt_len,
    )
    del ve, prep
    oom.release_cuda()
    for note in prepared.notes:
        notify(note)
    return prepared.conds


# --- speech ----------------------------------------------------------------------------------------------


def warm_up(model: LoadedModel, conds: Conditionals, first_chunk: str, settings: SynthesisSettings) -> float:
    """On a GPU, run T3 and S3Gen once at the shapes of the first chunk's early piece (its prompt length,
    its KV-cache capacity from `settings.max_tokens`, the early piece's length), so the first audio of a
    run does not wait for one-time work at those shapes (kernel selection and loading, attention plans,
    allocator growth). Returns the seconds it took (0 on the CPU, where there is nothing to gain)."""
    from chatterbox_cli import pipeline
    from chatterbox_cli.models.conds import S3_CODEBOOK_SIZE

    if model.device.type != "cuda":
        return 0.0
    started = time.perf_counter()
    settings = settings.for_variant(model.variant)
    n = model.early_tokens or presets.EARLY_TOKENS
    generator = torch.Generator(model.device).manual_seed(0)
    tokenizer = model.tokenizer.for_language(settings.language)
    text, _ = pipeline.text_tokens(tokenizer, first_chunk, 0, model.t3.config)
    model.use("t3")
    cond = conds.t3.to(model.device)
    decoding = model.t3.start_batch(
        [text],
        cond,
        max_new_tokens=settings.max_tokens,
        cfg_weight=settings.cfg_weight,
        sampling=settings.sampling(model.variant),
        generators=[generator],
        ignore_stop=True,
    )
    decoding.run(until=n)
    model.use("s3gen")  # the early piece's turn, with the KV cache on the GPU as in pipeline.synthesize
    tokens = torch.randint(0, S3_CODEBOOK_SIZE, (1, n), generator=generator, device=model.device)
    gen = conds.gen.to(model.device, model.flow_dtype)
    model.s3gen.synthesize(tokens, gen, n_timesteps=settings.flow_steps, generator=generator, keep_graph=True)
    del decoding
    model.use("t3")  # the first chunk starts with T3: its move is not part of the first audio
    torch.cuda.synchronize(model.device)
    return time.perf_counter() - started


# decode steps are launch-bound: 64 chunks (128 rows) decode at ~25x the tokens/s of one
AUTO_BATCH_LIMIT = 64


def batch_size(model: LoadedModel, request: LoadRequest, chunks: int) -> tuple[int, str]:
    """How many chunks T3 decodes together, and why. A given --batch is used as is; auto (0) takes as many
    as the GPU memory left after loading holds (KV cache and prefill workspace per chunk, S3Gen's workspace
    for the group, the estimate's margin), up to AUTO_BATCH_LIMIT; the CPU decodes one at a time."""
    wanted = max(1, chunks - 1)  # the first chunk always runs alone (pipeline.batch_groups)
    if request.batch > 0:
        return request.batch, f"batch {request.batch} (--batch)"
    if model.device.type != "cuda":
        return 1, "batch 1: the CPU decodes one chunk at a time"
    shape = model.t3_shape
    cfg, max_tokens = cfg_weight(request, model.variant) > 0, request.max_tokens
    text = estimate.TEXT_TOKENS_DEFAULT
    per_chunk = estimate.kv_cache_bytes(shape, max_tokens, 1, cfg, text)
    per_chunk += estimate.t3_workspace_bytes(shape, max_tokens, 1, cfg, text)
    model.use("t3")  # what is free during T3's turn, when the model takes turns
    free, _ = torch.cuda.mem_get_info(model.device)
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)
    room = free * (1 - estimate.MARGIN_FRACTION)
    size = min(AUTO_BATCH_LIMIT, wanted)
    turns = model.takes_turns

    def fits(n: int) -> bool:
        # S3Gen renders a whole group at once (its flow with blank rows, see s3gen.flow_batch_rows): its
        # workspace grows with the group too. Taking turns, S3Gen's turn has the KV caches' room to itself
        # (its weights are in T3's arena); without, its workspace comes on top of T3 and the KV caches.
        s3gen = estimate.s3gen_workspace_bytes(max_tokens, n, cfg)
        if turns:
            return max(n * per_chunk, s3gen) <= room
        return n * per_chunk + s3gen <= room

    while size > 1 and not fits(size):
        size -= 1
    return size, (
        f"batch {size}: {free / 2**30:.1f} GiB free after loading, "
        f"{per_chunk / 2**30:.2f} GiB per chunk (KV cache + workspace)"
    )


def trace_memory(model: LoadedModel, chunk: int) -> None:
    """With CHATTERBOX_MEMORY_TRACE=FILE, append this process's GPU memory after chunk `chunk` (1-based) to
    FILE as a JSON line: what benchmarks/small_card.py reads to see whether memory grows with the chunks,
    and in which of torch's memory pools (the general one, "0,0"; CUDA-graph pools by id)."""
    path = os.environ.get("CHATTERBOX_MEMORY_TRACE")
    if not path or model.device.type != "cuda":
        return
    index = model.device.index or 0
    pools: dict[str, list[int]] = {}  # pool id -> [segments, reserved bytes, allocated bytes]
    for segment in torch.cuda.memory_snapshot():
        if segment["device"] != index:
            continue
        pool = pools.setdefault(",".join(map(str, segment["segment_pool_id"])), [0, 0, 0])
        pool[0] += 1
        pool[1] += segment["total_size"]
        pool[2] += segment["allocated_size"]
    record = {
        "chunk": chunk,
        "time": time.time(),
        "preset": model.preset,
        "allocated_bytes": torch.cuda.memory_allocated(index),
        "reserved_bytes": torch.cuda.memory_reserved(index),
        "nvml_process_bytes": estimate.nvml_process_bytes(index, os.getpid()),
        "pools": pools,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


T = TypeVar("T")
VOICE_STAGE = "preparing the voice"


class ModelHolder:
    """One run's model, and the one place where running out of GPU memory is handled.

    Everything that touches the GPU goes through here: loading, voice preparation, warm-up, speaking.
    On CUDA out-of-memory anywhere, what the failed attempt held is dropped and returned to the driver
    first, then the holder steps down, in this order: a smaller batch; voice preparation on the CPU; the
    next preset down (presets.preset_names: fp16, bnb-8bit, bnb-4bit, bnb-4bit-swap); with
    `--device auto`, the CPU. Speaking continues from the chunk that failed, with the same seeds. A forced
    `--preset`, a forced device at its last preset, or `--no-fallback` end in OutOfMemoryError (exit 4)
    with advice that names only what has not been tried.
    """

    def __init__(
        self, request: LoadRequest, notify: Notify = _quiet, decision: Decision | None = None
    ) -> None:
        self.request = request
        self.notify = notify
        self.checkpoint = resolve(request)
        self.decision = decision or decide(request, self.checkpoint)
        notify(self.decision.reason)
        self._model: LoadedModel | None = None
        self.voice_device: torch.device | None = None  # where clips are prepared; None: the model's device
        self.batch_cap: int | None = None  # the largest batch that may run, after one ran out of memory
        self.step_downs: list[str] = []  # what each step-down did, in order
        self._batch_said = ""  # the batch size's reason, said once until it changes

    @property
    def model(self) -> LoadedModel:
        """The loaded model, loading it (with step-down) when there is none yet or a step-down dropped it."""
        if self._model is None:
            self._model = self._attempt(
                "loading", lambda: load_decided(self.checkpoint, self.decision, self.request, self.notify)
            )
        return self._model

    def voice(self, source: str | None, exaggeration: float) -> Conditionals:
        return self._attempt(
            VOICE_STAGE,
            lambda: voice(self.model, source, exaggeration, self.notify, self.voice_device),
        )

    def warm_up(self, conds: Conditionals, first_chunk: str, settings: SynthesisSettings) -> float:
        return self._attempt("warming up", lambda: warm_up(self.model, conds, first_chunk, settings))

    def _attempt(self, stage: str, work: Callable[[], T]) -> T:
        while True:
            try:
                return work()
            except Exception as e:
                if not oom.is_out_of_memory(e):
                    raise
                error = oom.forget_frames(e)
            # out of the except block: the failed attempt's frames, and so its tensors, are gone now
            self._recover(stage, error)

    def _recover(self, stage: str, error: BaseException) -> None:
        """Step down after `error` (CUDA out-of-memory) at `stage`; raise OutOfMemoryError if there is no
        step left that the request allows."""
        model = self._model
        on_gpu = model is not None and model.device.type == "cuda"
        if stage == VOICE_STAGE and on_gpu and self.voice_device is None:
            oom.release_cuda()
            self.voice_device = torch.device("cpu")
            self._say("out of GPU memory preparing the voice; preparing it on the CPU instead")
            return
        self._model = model = None
        oom.release_cuda()
        lower = self._lower_decision()
        if lower is None:
            raise OutOfMemoryError(self._advice(stage)) from error
        where = "on the CPU" if lower.preset == CPU_PRESET else f"with {lower.preset}"
        self._say(f"out of GPU memory {stage} with {self.decision.preset}; continuing {where}")
        self.decision = lower

    def _say(self, message: str) -> None:
        self.step_downs.append(message)
        self.notify(message)

    def _lower_decision(self) -> Decision | None:
        """The next step down that the request allows, or None."""
        request, current = self.request, self.decision
        if not request.fallback or request.preset != "auto" or current.preset == CPU_PRESET:
            return None
        lower = next_preset(current.preset, self.checkpoint)
        if lower is not None:
            reason = f"stepped down to {lower} after running out of GPU memory"
            return Decision(current.device, lower, current.dtype, reason, current.free_bytes, None)
        if request.device != "auto":
            return None
        reason = "running on the CPU: no preset fits in the GPU memory that is free"
        return Decision(torch.device("cpu"), CPU_PRESET, torch.float32, reason, current.free_bytes, None)

    def _advice(self, stage: str) -> str:
        """Why the run stops, naming only steps that have not been tried."""
        request, preset = self.request, self.decision.preset
        lower = lower_presets(preset, self.checkpoint)
        if request.preset != "auto":
            auto = "--preset auto" + ("" if request.fallback else " without --no-fallback")
            tries = [f"--preset {p}" for p in lower] + [f"{auto} (it steps down by itself)"]
            fix = "try " + ", ".join(tries) + ", a shorter --max-tokens, or --device cpu"
        elif not request.fallback:
            nxt = lower[0] if lower else "the CPU" if request.device == "auto" else None
            fix = "drop --no-fallback to step down by itself" + (f" (next: {nxt})" if nxt else "")
            if nxt is None:
                fix = f"{preset} is the smallest GPU preset; free GPU memory, or use --device cpu"
        else:
            fix = f"{preset} is the smallest GPU preset; free GPU memory, or use --device auto or cpu"
        return f"out of GPU memory {stage} with preset {preset}; {fix}"

    def speak(
        self, chunks: list[str], conds: Conditionals, settings: SynthesisSettings
    ) -> Iterator[AudioChunk]:
        """Audio for each chunk of one run, in order, as it is made: the first chunk alone (its early piece
        comes soonest), then groups as large as `group_size` allows, each through `speak_rows`."""
        from chatterbox_cli.pipeline import ChunkRow

        settings = settings.with_seed()
        assert settings.seed is not None
        done = 0
        while done < len(chunks):
            size, why = self.group_size(len(chunks) - done) if done else (1, "")
            if size > 1 and why != self._batch_said:
                self._batch_said = why
                self.notify(why)
            rows = [ChunkRow(chunks[i], i, settings.seed) for i in range(done, min(done + size, len(chunks)))]
            for _, chunk in self.speak_rows(rows, conds, settings):
                if chunk.final:
                    done += 1
                yield chunk
                if chunk.final and self._model is not None:
                    trace_memory(self._model, done)

    def group_size(self, wanted: int) -> tuple[int, str]:
        """How many chunks may decode together now (service.batch_size, under the cap an out-of-memory
        left), at most `wanted` (at least 1), and why."""
        size, why = batch_size(self.model, self.request, wanted + 1)
        if self.batch_cap is not None and size > self.batch_cap:
            size, why = self.batch_cap, f"batch {self.batch_cap} after running out of memory"
        return max(1, min(size, wanted)), why

    def speak_rows(
        self, rows: Sequence[ChunkRow], conds: Conditionals, settings: SynthesisSettings
    ) -> Iterator[tuple[int, AudioChunk]]:
        """Speak a group of chunk rows (pipeline.speak_group; rows may come from different runs), yielding
        (row, AudioChunk) as audio is made, each row's final piece exactly once and in row order.

        On CUDA out-of-memory the rows not yet finished are spoken again: in groups half as large first,
        then after a step-down (see the class), with the same seeds; samples of a row already yielded (an
        early piece) are not repeated."""
        from chatterbox_cli import pipeline

        pending = list(range(len(rows)))
        written = [0] * len(rows)  # samples of each row already yielded as an early piece
        while pending:
            model = self.model
            part = pending[: self.batch_cap or len(pending)]
            early = 0 if any(written[j] for j in part) else model.early_tokens
            pieces = pipeline.speak_group(model, [rows[j] for j in part], conds, settings, early_tokens=early)
            del model  # a step-down must be able to free it
            try:
                for k, chunk in pieces:
                    j = part[k]
                    if not chunk.final:
                        written[j] += chunk.audio.shape[0]
                    elif written[j] and not early:  # remade after an OOM: skip what was said
                        audio = fade_edges(chunk.audio[written[j] :], pipeline.SAMPLE_RATE, end=False)
                        chunk = dataclasses.replace(chunk, audio=audio)
                    if chunk.final:
                        pending.remove(j)
                    yield j, chunk
                continue
            except Exception as e:
                if not oom.is_out_of_memory(e):
                    raise
                error = oom.forget_frames(e)
            pieces.close()
            del pieces
            at = f"at chunk {rows[pending[0]].index + 1}"
            if len(part) > 1:
                self.batch_cap = len(part) // 2
                oom.release_cuda()
                self._say(
                    f"out of GPU memory decoding {len(part)} chunks at once {at}; trying {self.batch_cap}"
                )
                continue
            self._recover(at, error)
