#!/bin/bash
# The GPU check, for a machine with a CUDA GPU and an image that already holds torch, triton and transformers but
# no registry access: the rest of our dependencies come as wheels in .whl/, and a model dir (config + tokenizer) in
# .gpu/tok/ gets random weights of its shapes when the real weights cannot travel. Runs tests/gpu with Triton
# compiling, then `optiserve serve --device cuda --quant nvfp4` with a chat, a streamed chat and a metrics scrape.
# Logs go to $OUT (default /tmp/gpu-check).
# Prepared on the machine that sends the tree (both folders git-ignored; a device call carries them):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl fastapi starlette pydantic pydantic_core annotated_types \
#     typing_inspection typing_extensions uvicorn gguf annotated-doc opentelemetry-api   # versions: constraints.txt
#   mkdir -p .gpu/tok && (cd ~/.cache/optiserve/models/SmolLM2-135M-Instruct && \
#     cp config.json generation_config.json tokenizer*.json chat_template.jinja "$OLDPWD/.gpu/tok/")
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OPTISERVE_CACHE=/tmp/optiserve-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail -20 "$OUT/install.log"; exit 1; }

MODEL=${OPTISERVE_GPU_MODEL:-default}
if [ -d .gpu/tok ] && [ "$MODEL" = default ]; then
  MODEL=/tmp/random-model
  python3 - "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
out, src = Path(sys.argv[1]), Path(".gpu/tok")
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(src)
cfg.initializer_range = 0.1  # wider than the usual 0.02: greedy tokens far from ties
AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
for f in src.iterdir():
    if not (out / f.name).exists():
        shutil.copy(f, out / f.name)
print("random-weight model with", src, "shapes at", out)
EOF
fi
export OPTISERVE_GPU_MODEL=$MODEL

echo "== tests/gpu $(date +%T)"
timeout 240 python3 -m pytest tests/gpu -q -s -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -40
echo "== serve --device cuda --quant nvfp4 $(date +%T)"
optiserve serve --model "$MODEL" --device cuda --quant nvfp4 --port 8765 --max-model-len 1024 >"$OUT/serve.log" 2>&1 &
server=$!
for _ in $(seq 180); do curl -sf localhost:8765/health >/dev/null && break; kill -0 $server || break; sleep 1; done
name=$(curl -s localhost:8765/v1/models | python3 -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
chat='{"model": "'$name'", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24'
curl -s localhost:8765/v1/chat/completions -H 'content-type: application/json' -d "$chat}" | head -c 600; echo
curl -sN localhost:8765/v1/chat/completions -H 'content-type: application/json' -d "$chat, \"stream\": true}" \
  | tail -3
curl -s localhost:8765/metrics | grep -E "^optiserve:(request_success_total|generation_tokens_total)" | head
kill $server; wait $server
tail -5 "$OUT/serve.log"
