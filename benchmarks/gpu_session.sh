#!/usr/bin/env bash
# One device-machine session: install carried wheels, then run what is asked (probe, gpu tests, benchmarks).
# Usage on the GPU machine: bash benchmarks/gpu_session.sh probe tests speed memory caps first small variants serve
# Wheels travel in .wheels/ (ours: bitsandbytes, soundfile, cffi, pycparser, soxr, nvidia-ml-py, typer and
# rich with their pure-Python dependencies; pyloudnorm and future for the Turbo tests; for `serve`: fastapi
# 0.115 (later ones import opentelemetry), starlette 0.46, uvicorn, h11, anyio, sniffio, idna, httpx,
# httpcore, certifi; for the server tests' official client: openai, jiter, httpx2, httpcore2, truststore;
# pydantic 2.13 with pydantic-core, annotated-types, typing-inspection and, for typer 0.29, annotated-doc: the
# machine has no pydantic; installed without dependencies, so a wheel a later version needs must come too) and
# .refwheels/
# (the reference chatterbox-tts 0.1.7 and its pure-Python deps). Results land in $RESULTS (/tmp/results),
# and after every step all of them in one file, $OUT/results.tar: the device tool brings back at most 8
# files, and a step that a call's time limit cuts off loses only its own.
set -uo pipefail
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
BACK=${OUT:-/tmp/out}
export OUT=${RESULTS:-/tmp/results}
mkdir -p "$OUT" "$BACK"
[ -d .wheels ] && python3 -m pip install -q --no-deps --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARNING
[ -d .refwheels ] && python3 -m pip install -q --no-deps --target /tmp/refsite .refwheels/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD
CK=/tmp/ck-full
# Ray's wheel (79 MB) is over what one call carries: split it (split -b 40000000) into .gpu/ray1/part-aa and
# .gpu/ray2/part-ab (with its dependencies' wheels beside it), then call `ray-part` carrying .gpu/ray1 and,
# while the machine is warm (its /tmp survives), `ray` carrying .gpu/ray2.
# STEP_S=N stops any one step after N seconds, so a slow step leaves the call time for the next ones.
py() { timeout -k 5 "${STEP_S:-0}" python3 "$@"; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    probe) py -m chatterbox_cli probe-vram --json | tee "$OUT/probe.json" ;;
    tests) py -m pytest -m gpu -q -p no:cacheprovider ${TESTS:-} 2>&1 | tee "$OUT/gpu-tests${TESTS_TAG:-}.log" | tail -15 ;;
    speed) py benchmarks/speed.py --checkpoint $CK --reference-site /tmp/refsite ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.log" | tail -60 ;;
    speed-ours) py benchmarks/speed.py --checkpoint $CK ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.log" | tail -40 ;;
    memory) py benchmarks/memory.py --checkpoint $CK --presets ${MEM_PRESETS:-fp16,bnb-8bit,bnb-4bit} --caps "" --budget-s ${MEM_BUDGET:-400} > "$OUT/memory.json" 2> "$OUT/memory.log"; tail -5 "$OUT/memory.log" ;;
    caps) OUT= py benchmarks/memory.py --checkpoint $CK --presets "" --caps 2,4,6 > "$OUT/caps.json" 2> "$OUT/caps.log"; tail -5 "$OUT/caps.log" ;;
    first) py benchmarks/first_audio.py --checkpoint $CK ${FIRST_ARGS:-} > "$OUT/first_audio.json" 2> >(tee "$OUT/first_audio.log" >&2) ;;
    first-turbo) py benchmarks/first_audio.py --checkpoint /tmp/ck-turbo --variant turbo ${FIRST_TURBO_ARGS:-} > "$OUT/first_audio_turbo.json" 2> >(tee "$OUT/first_audio_turbo.log" >&2) ;;
    variants) py benchmarks/variant_speed.py --folder /tmp/ck-variants ${VARIANT_ARGS:-} > "$OUT/variant_speed.json" 2> >(tee "$OUT/variant_speed.log" >&2) ;;
    profile) py benchmarks/decode_profile.py --folder /tmp/ck-variants ${PROFILE_ARGS:-} > "$OUT/decode_profile.json" 2> >(tee "$OUT/decode_profile.log" >&2) ;;
    eval) py -m chatterbox_cli eval --model ${EVAL_MODEL:-$CK} --preset ${EVAL_PRESETS:-all} --against fp16 ${EVAL_ARGS:-} --json > "$OUT/eval${EVAL_TAG:-}.json" 2> >(tee "$OUT/eval${EVAL_TAG:-}.log" >&2) ;;
    serve) py benchmarks/serve_load.py --checkpoint $CK ${SERVE_ARGS:-} --log "$OUT/serve${SERVE_TAG:-}.server.log" > "$OUT/serve_load${SERVE_TAG:-}.json" 2> >(tee "$OUT/serve_load${SERVE_TAG:-}.log" >&2) ;;
    determinism) py benchmarks/determinism.py --checkpoint $CK ${DET_ARGS:-} > "$OUT/determinism.json" 2> >(tee "$OUT/determinism.log" >&2) ;;
    round) py benchmarks/round_profile.py --checkpoint $CK ${ROUND_ARGS:-} > "$OUT/round${ROUND_TAG:-}.json" 2> >(tee "$OUT/round${ROUND_TAG:-}.log" >&2) ;;
    flowgraph) py benchmarks/flow_graph.py --checkpoint $CK ${FLOWGRAPH_ARGS:-} > "$OUT/flow_graph.json" 2> >(tee "$OUT/flow_graph.log" >&2) ;;
    ray-part) mkdir -p /tmp/rayparts && cp .gpu/ray1/part-* /tmp/rayparts/ && ls -la /tmp/rayparts ;;
    ray) W=/tmp/raywheel/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl; mkdir -p /tmp/raywheel
      cat /tmp/rayparts/part-* .gpu/ray2/part-* > $W && python3 -m pip install -q --no-deps --target /tmp/site $W .gpu/ray2/*.whl 2>&1 | grep -v WARNING
      mkdir -p /tmp/rayck && ln -sfn $CK /tmp/rayck/full
      py benchmarks/ray_batch.py --device cuda --folder /tmp/rayck ${RAY_ARGS:-} > "$OUT/ray_batch.json" 2> >(tee "$OUT/ray_batch.log" >&2) ;;
    small) py benchmarks/small_card.py --checkpoint $CK --out "$OUT/small_card${SMALL_TAG:-}.json" ${SMALL_ARGS:-} > /dev/null 2> >(tee "$OUT/small_card${SMALL_TAG:-}.log" >&2) ;;
    *) echo "unknown step $step" ;;
  esac
  tar -cf "$BACK/results.tar" -C "$OUT" .
done
