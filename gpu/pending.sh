#!/usr/bin/env bash
# The GPU measurements written but not yet run (session 10 had no device time), in calls that
# each fit the device's 10-minute limit. Here: `bash gpu/make_carry.sh`; then one `run` per
# stage, carrying carry/:  bash gpu/pending.sh STAGE   (outputs under $OUT, one file each).
#   A: the CUDA tests on the default kernel and on the field path, the fused rotation's check
#      and its decode timing at 8k (B=1, B=8).
#   B: the prefill profile at B=8 x 32k on 8 of the 32 layers, kernels vs the torch scoring.
#   C: `kvmix.bench gpu` at 8k B=8 (not re-measured since the host work was cut) and the
#      capacity searches at 32k (the earlier ones were not clean).
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/setup.sh > "$OUT/setup.txt" 2>&1
cp /tmp/kvmixpy/kvmix/_kvmix*.so python/kvmix/
export PYTHONPATH=$PWD/python:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
# `both NAME SECONDS CMD...`: CMD with this tree, into $OUT/NAME.txt, then (where carry/base
# holds main before a change: `git archive <commit> python/kvmix | tar -x -C carry/base`) the
# same with that tree first on the path, into $OUT/NAME-base.txt: a baseline in the same call.
# BASE names another such tree (default carry/base).
both() {
  local name=$1 secs=$2 base=${BASE:-carry/base}
  shift 2
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  if [ -d "$base/python/kvmix" ]; then
    cp /tmp/kvmixpy/kvmix/_kvmix*.so "$base/python/kvmix/"
    PYTHONPATH=$PWD/$base/python:$PYTHONPATH timeout "$secs" "$@" \
      > "$OUT/$name-base.txt" 2>&1
  fi
}
case "${1:-}" in
A)
  timeout 150 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  KVMIX_TRITON_FIELDS=1 timeout 150 python3 -m pytest -q -m cuda tests \
    > "$OUT/pytest-cuda-fields.txt" 2>&1
  timeout 260 python3 -u gpu/rotation_fused.py > "$OUT/rotation-fused.txt" 2>&1
  ;;
B)
  timeout 540 python3 -u gpu/prefill_profile.py --layers 8 > "$OUT/prefill-profile.txt" 2>&1
  ;;
C)
  timeout 280 python3 -u -m kvmix.bench gpu --batches 8 --contexts 8192 --steps 8 \
    --methods full quanto-int2 zipcache kvmix-5x --json "$OUT/bench-8k-b8.json" \
    > "$OUT/bench-8k-b8.txt" 2>&1
  timeout 280 python3 -u -m kvmix.bench gpu --max-batch --batches 1 --contexts 8192 --steps 2 \
    --methods full zipcache --json "$OUT/capacity.json" > "$OUT/capacity.txt" 2>&1
  ;;
D)
  # Session 11: the flash forward's LSE in the scoring (its CUDA test), where one layer's
  # scoring + compression spend their time, the prefill end to end with the kernels' tiles
  # swept, and the capacity searches with the fill's chunk at 2048 tokens.
  timeout 120 python3 -m pytest -q -m cuda tests/test_triton_scoring.py \
    > "$OUT/pytest-cuda-scoring.txt" 2>&1
  timeout 90 python3 -u gpu/compression_profile.py > "$OUT/compression-profile.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --sweep > "$OUT/prefill-profile.txt" 2>&1
  timeout 220 python3 -u -m kvmix.bench gpu --max-batch --max-batch-chunk 2048 --batches 1 \
    --contexts 1024 --steps 2 --methods full zipcache kvmix-5x --json "$OUT/capacity.json" \
    > "$OUT/capacity.txt" 2>&1
  ;;
E)
  # Session 11, second call: the LSE from the kernel SDPA chooses (cuDNN on the H200), its
  # CUDA test, and the stacked-heads column pass in the tile sweep.
  timeout 120 python3 -m pytest -q -m cuda tests/test_triton_scoring.py \
    > "$OUT/pytest-cuda-scoring.txt" 2>&1
  timeout 300 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --sweep > "$OUT/prefill-profile.txt" 2>&1
  ;;
F)
  # Session 11, last call: every CUDA test on the final code, and the prefill end to end with
  # the stacked column pass as the default.
  timeout 100 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 110 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    > "$OUT/prefill-profile.txt" 2>&1
  ;;
G)
  # Session 12, first call: every CUDA test with kvmix-5x's unbiased range search as its
  # default, real-device parity (the clipped cases included), and the prefill end to end with
  # and without the search (what it costs the compression on a GPU).
  timeout 150 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 120 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x kvmix-5x-minmax > "$OUT/prefill-profile.txt" 2>&1
  ;;
H)
  # Session 12, second call: per-channel grids fitted in row chunks across the GPU (the range
  # search's 12 passes over a segment were one program per channel block): parity with the
  # Rust engine, every CUDA test, and the prefill again with and without the search.
  timeout 120 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  timeout 150 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x kvmix-5x-minmax > "$OUT/prefill-profile.txt" 2>&1
  ;;
I)
  # Session 12, third call: the channel kernels accumulate elementwise and reduce once, one
  # program per clip candidate; the prefill with and without the search, and one layer's
  # kernel table for kvmix-5x (where the search's time goes).
  timeout 100 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x kvmix-5x-minmax > "$OUT/prefill-profile.txt" 2>&1
  timeout 120 python3 -u gpu/compression_profile.py --methods kvmix-5x --rows 20 \
    > "$OUT/compression-profile.txt" 2>&1
  ;;
J)
  # Session 12, fourth call: segments packed back to back (no page holes). Bytes against the
  # Rust store and the decode attention time, this tree and (oldpy/: the package at e57ac2a,
  # carried, same extension) the tree before; every CUDA test; decode end to end at B8 x 8k.
  timeout 120 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 150 python3 -u gpu/pages_check.py --rust > "$OUT/pages.txt" 2>&1
  if [ -d oldpy/kvmix ]; then
    cp /tmp/kvmixpy/kvmix/_kvmix*.so oldpy/kvmix/
    PYTHONPATH=$PWD/oldpy:$PYTHONPATH timeout 100 python3 -u gpu/pages_check.py \
      > "$OUT/pages-before.txt" 2>&1
  fi
  timeout 180 python3 -u -m kvmix.bench gpu --batches 8 --contexts 8192 --steps 8 \
    --methods full zipcache kvmix-5x --json "$OUT/bench-8k-b8.json" > "$OUT/bench-8k-b8.txt" 2>&1
  ;;
K)
  # Session 12, last call: the merged tree (packed segments, one column kernel, compression in
  # the buffer's dtype, channel grids in chunks): the CUDA tests of the changed parts, and the
  # prefill end to end.
  timeout 80 python3 -m pytest -q -m cuda tests/test_triton_segments.py \
    tests/test_engine_cache.py tests/test_triton_scoring.py > "$OUT/pytest-cuda.txt" 2>&1
  timeout 130 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  ;;
L)
  # Session 13, first call: the column pass with an unmasked run for the rows that see the
  # whole key block (its CUDA tests, its tiles swept, the prefill end to end), and the pages
  # branch's cheaper row masking (4c4864e, carried as pagespy/): its CUDA tests and the decode
  # attention time against this tree's kernels.
  timeout 60 python3 -m pytest -q -m cuda tests/test_triton_scoring.py \
    > "$OUT/pytest-cuda-scoring.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_profile.py --skip-e2e --scoring triton --skip-every-row \
    --sweep --sweep-kernels received_stacked > "$OUT/prefill-sweep.txt" 2>&1
  timeout 70 python3 -u gpu/pages_check.py --presets zipcache --contexts 32768 --decode 20 \
    > "$OUT/pages-main.txt" 2>&1
  if [ -d pagespy/kvmix ]; then
    cp /tmp/kvmixpy/kvmix/_kvmix*.so pagespy/kvmix/
    PYTHONPATH=$PWD/pagespy:$PYTHONPATH timeout 70 python3 -u gpu/pages_check.py \
      --presets zipcache --contexts 32768 --decode 20 > "$OUT/pages-4c4864e.txt" 2>&1
    PYTHONPATH=$PWD/pagespy:$PYTHONPATH timeout 90 python3 -m pytest -q -m cuda \
      tests/test_engine_cache.py tests/test_triton_segments.py tests/test_triton_attention.py \
      > "$OUT/pytest-cuda-4c4864e.txt" 2>&1
  fi
  ;;
M)
  # Session 13, second call: the swept column tile as the default (16 rows per head, tiles
  # summed elementwise); its CUDA tests, where ZipCache's and kvmix-5x's compression spend
  # their time, the prefill end to end, and the decode attention of 4c4864e (pagespy/) with
  # the time its first call needs to compile.
  timeout 150 python3 -m pytest -q -m cuda tests/test_triton_scoring.py \
    > "$OUT/pytest-cuda-scoring.txt" 2>&1
  timeout 120 python3 -u gpu/compression_profile.py --methods zipcache kvmix-5x --rows 22 \
    > "$OUT/compression-profile.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  if [ -d pagespy/kvmix ]; then
    cp /tmp/kvmixpy/kvmix/_kvmix*.so pagespy/kvmix/
    PYTHONPATH=$PWD/pagespy:$PYTHONPATH timeout 150 python3 -u gpu/pages_check.py \
      --presets zipcache --contexts 32768 --decode 20 > "$OUT/pages-4c4864e.txt" 2>&1
  fi
  ;;
N)
  # Session 13, third call: the prompt copied into the buffer in one strided copy; one
  # layer's prefill step by step (synchronized, as the phase timers see it), more column
  # tiles, the CUDA tests of the store, and the prefill end to end.
  timeout 100 python3 -u gpu/prefill_steps.py > "$OUT/prefill-steps.txt" 2>&1
  timeout 120 python3 -m pytest -q -m cuda tests/test_engine_cache.py \
    tests/test_triton_segments.py tests/test_engine_contract.py > "$OUT/pytest-cuda.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_profile.py --skip-e2e --scoring triton --skip-every-row \
    --sweep --sweep-kernels received_stacked > "$OUT/prefill-sweep.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  ;;
O)
  # Session 13, fourth call: the field path's launch parameters (warps, pipelining stages,
  # programs) at ZipCache B8 x 32k against SDPA and the bound.
  timeout 400 python3 -u benches/gpu_triton.py --fields-sweep > "$OUT/fields-sweep.txt" 2>&1
  ;;
P)
  # Session 13, last call: a prompt's rotation by one Walsh-Hadamard kernel on the GPU
  # (kvmix-5x), every CUDA test, one layer step by step, and the prefill end to end.
  timeout 170 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_steps.py --methods kvmix-5x > "$OUT/prefill-steps.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  ;;
Q)
  # Session 14: the classification reads the buffer's rows where they are (no gathered
  # copies; separable factors from the channel kernel's extremes), the candidates' errors
  # summed elementwise over a chunk's tiles (chunks of 512), the column pass's two row runs in
  # one helper: one layer step by step, the channel kernels' launch swept, every CUDA test,
  # and the prefill end to end.
  timeout 90 python3 -u gpu/prefill_steps.py > "$OUT/prefill-steps.txt" 2>&1
  timeout 120 python3 -u gpu/compression_profile.py --skip-profile --channel-sweep --reps 3 \
    --methods kvmix-5x > "$OUT/channel-sweep.txt" 2>&1
  timeout 130 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x > "$OUT/prefill-profile.txt" 2>&1
  ;;
R)
  # Session 14, second call: the visible counts by a running count (no search per key); one
  # layer step by step, and the prefill end to end at B=8 and at B=1 (32k).
  timeout 90 python3 -u gpu/prefill_steps.py > "$OUT/prefill-steps.txt" 2>&1
  timeout 170 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x kvmix-5x-minmax --repeats 3 > "$OUT/prefill-profile.txt" 2>&1
  timeout 120 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  ;;
U)
  # Session 18: the CUDA tests, the prefill profile at B=8 and B=1 x 32k, then the step
  # table with its kernel table at B=8.
  timeout 150 python3 -m pytest -q -x -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --repeats 3 > "$OUT/prefill-profile.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  timeout 120 python3 -u gpu/prefill_steps.py --reps 2 --kernel-table 25 > "$OUT/steps-b8.txt" 2>&1
  ;;
X)
  # Session 19: correctly rounded divisions and no fp contraction in the store's kernels.
  # The CUDA tests (the contract against the Rust store at 10M values is new) and the parity
  # script (before: 638 and 2019 differing ZipCache values, 56 uniform at 20k). (The run
  # also tried the decode kernel at 16- and 32-row pages: refused, a segmented tier is read
  # in pages of PAGE = 64 rows: stage P2 sets the store's page with the kernel's.)
  timeout 240 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  PARITY_LENGTHS=5000,20000 timeout 120 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  ;;
Y)
  # Session 19, second call: the step table at B=8 before (carry/old: the tree of b1cd762,
  # IEEE-approximate divisions, fp contraction) and after, then the prefill profile at B=8
  # and B=1 x 32k.
  cp /tmp/kvmixpy/kvmix/_kvmix*.so carry/old/python/kvmix/
  PYTHONPATH=$PWD/carry/old/python:$PYTHONPATH timeout 100 python3 -u gpu/prefill_steps.py \
    --reps 2 --kernel-table 8 > "$OUT/steps-b8-old.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_steps.py --reps 2 --kernel-table 8 > "$OUT/steps-b8.txt" 2>&1
  timeout 170 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --repeats 3 > "$OUT/prefill-profile.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  ;;
X2)
  # Session 19, third call: the range-search kernels with fp contraction again (their one
  # product that must round alone by an fma with a zero addend), the rest without: the CUDA
  # contract tests, the parity script, the step table before (b1cd762) and after, and the
  # prefill profile at B=8 x 32k.
  timeout 120 python3 -m pytest -q -m cuda tests/test_engine_contract.py --tb=short \
    > "$OUT/pytest-cuda-contract.txt" 2>&1
  PARITY_LENGTHS=5000,20000 timeout 100 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  cp /tmp/kvmixpy/kvmix/_kvmix*.so carry/old/python/kvmix/
  PYTHONPATH=$PWD/carry/old/python:$PYTHONPATH timeout 80 python3 -u gpu/prefill_steps.py \
    --reps 2 --kernel-table 8 > "$OUT/steps-b8-old.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_steps.py --reps 2 --kernel-table 8 > "$OUT/steps-b8.txt" 2>&1
  timeout 150 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --repeats 3 > "$OUT/prefill-profile.txt" 2>&1
  ;;
X3)
  # Session 19, last call: every quotient from one Markstein step (the encodes too, and
  # the reciprocal from Triton's approximate `/`): all CUDA tests (the division test and
  # the contract at 10M values are new), the parity script at 5000 tokens, the step table.
  timeout 300 python3 -m pytest -q -m cuda tests --tb=short > "$OUT/pytest-cuda.txt" 2>&1
  PARITY_LENGTHS=5000 timeout 60 python3 -u gpu/parity.py > "$OUT/parity.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_steps.py --reps 2 --kernel-table 8 > "$OUT/steps-b8.txt" 2>&1
  ;;
P2)
  # Session 19: the decode kernel's page (the store's PAGE and block_n) at 64, 32, 16 rows.
  timeout 100 python3 -u benches/gpu_triton.py --page-sweep > "$OUT/page-sweep.txt" 2>&1
  ;;
C20)
  # Session 20 (not run: no device was lent): the carried page loop of the field path
  # against the per-page one, after the device check; the CUDA attention, contract and cache
  # tests with the carried loop on. If it is faster and they pass, make it the default.
  timeout 200 python3 -u benches/gpu_triton.py --carried > "$OUT/carried.txt" 2>&1
  KVMIX_TRITON_CARRIED=1 timeout 240 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_contract.py tests/test_engine_cache.py --tb=short \
    > "$OUT/pytest-cuda-carried.txt" 2>&1
  ;;
C21|C21S)
  # Session 21: C20 (the carried loop against the per-page one, the CUDA tests with it on);
  # C21 then adds where one layer's prefill spends its time at B=1 x 32k (steps, host
  # profile, device kernels): the phase timers' target at B=1 is not met and the host side
  # was never profiled. C21S leaves that out, for a call with less device time left.
  timeout 200 python3 -u benches/gpu_triton.py --carried > "$OUT/carried.txt" 2>&1
  KVMIX_TRITON_CARRIED=1 timeout 200 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_contract.py tests/test_engine_cache.py --tb=short \
    > "$OUT/pytest-cuda-carried.txt" 2>&1
  if [ "$1" = C21 ]; then
    timeout 150 python3 -u gpu/prefill_steps.py --batch 1 --reps 5 --cprofile 40 \
      --kernel-table 14 > "$OUT/prefill-steps-b1.txt" 2>&1
  fi
  ;;
C22)
  # Session 22: carried-default merged (C21 on H100: carried 149/138 us against per-page
  # 185/174 at ZipCache B8 x 32k). The CUDA attention, contract and cache tests on the
  # merged code, then the decoding step end to end at B=8 x 32k beside DynamicCache.
  timeout 200 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_contract.py tests/test_engine_cache.py --tb=short \
    > "$OUT/pytest-cuda.txt" 2>&1
  timeout 280 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 8 \
    --methods full zipcache kvmix-5x > "$OUT/bench-32k-b8.txt" 2>&1
  ;;
C22S)
  # Session 22: the field path's launch parameters (warps, stages, programs, a register cap)
  # now that the carried loop is its only loop; where a B=1 x 32k prefill makes the host wait
  # for the GPU and the GPU for the host; the prefill by the phase timers at B=1 x 32k after
  # session 21's host cuts; the page size again; B=1's host profile in microseconds (C21's
  # printed seconds to 3 decimals: all 0.000); last, the prefill at B=8 x 32k.
  timeout 200 python3 -u benches/gpu_triton.py --fields-sweep > "$OUT/fields-sweep.txt" 2>&1
  timeout 120 python3 -u gpu/sync_points.py --batch 1 --context 32768 --layers 2 \
    > "$OUT/sync-points.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  timeout 120 python3 -u benches/gpu_triton.py --page-sweep > "$OUT/page-sweep.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_steps.py --batch 1 --reps 5 --cprofile 45 \
    > "$OUT/prefill-steps-b1.txt" 2>&1
  timeout 170 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --repeats 3 > "$OUT/prefill-profile.txt" 2>&1
  ;;
C22K)
  # C22S's first part alone (for a call with little device time left): the launch sweep.
  timeout 190 python3 -u benches/gpu_triton.py --fields-sweep > "$OUT/fields-sweep.txt" 2>&1
  ;;
C23)
  # Session 23 (the rest of C22S, which no device ran): where a B=1 x 32k prefill makes the
  # host wait for the GPU and the GPU for the host (sync debug mode, idle gaps charged to
  # what launched next); the prefill by the phase timers at B=1 x 32k after session 21's host
  # cuts; B=1's host profile in microseconds; the decoding step end to end at B=8 x 32k with
  # the field path's new default (2112 programs; C22's 28.9 / 35.8 ms were at 4224).
  timeout 120 python3 -u gpu/sync_points.py --batch 1 --context 32768 --layers 2 \
    > "$OUT/sync-points.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  timeout 80 python3 -u gpu/prefill_steps.py --batch 1 --reps 5 --cprofile 45 \
    > "$OUT/prefill-steps-b1.txt" 2>&1
  timeout 250 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 8 \
    --methods zipcache kvmix-5x > "$OUT/bench-32k-b8.txt" 2>&1
  ;;
C23B)
  # Session 23, second call: the B=1 x 32k prefill after the rotation is checked once on the
  # CPU (C23: set_rotation's read-back drained the queue at every layer, and the store
  # allocations after it left the GPU idle, ~1.6 ms a layer for kvmix-5x), end to end and by
  # its idle gaps; then whether a decoding step at B=8 x 32k is host bound (GPU busy against
  # wall time per step, device time by kernel; C23's 42.5 / 54.6 ms against C22's 28.9 / 35.8).
  timeout 120 python3 -u gpu/sync_points.py --batch 1 --context 32768 --layers 2 \
    --methods zipcache kvmix-5x > "$OUT/sync-points.txt" 2>&1
  timeout 100 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  timeout 200 python3 -u gpu/sync_points.py --batch 8 --context 32768 --layers 4 --decode 4 \
    --methods full zipcache kvmix-5x > "$OUT/sync-points-decode.txt" 2>&1
  ;;
C23C)
  # Session 23, third call: C23B's decode profile at B=8 x 32k put kvmix-5x's attend kernel
  # at 812 us a layer against ZipCache's 205 (H200): its low tier's 3-bit keys take the
  # integer path at the field path's launch (1 warp). The presets' layouts, launch variants.
  timeout 420 python3 -u benches/gpu_triton.py --presets > "$OUT/presets.txt" 2>&1
  ;;
C23D)
  # Session 23, fourth call: kvmix-5x's 3-bit keys on the field path (int16 elements, three
  # per two 24-bit groups, inline-PTX fields): the presets' correctness (float64 reference,
  # bitwise against plain unpacking) and timing at B8 x 32k against C23C's 528 / 511 us, then
  # the CUDA tests.
  timeout 300 python3 -u benches/gpu_triton.py --presets > "$OUT/presets.txt" 2>&1
  timeout 200 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_contract.py tests/test_engine_cache.py > "$OUT/pytest-cuda.txt" 2>&1
  ;;
C23E)
  # Session 23, last call: C23D compared the inline PTX against the integer path, not the
  # field path's plain unpacking; that check again, then the decoding step at B=8 x 32k on
  # 4 layers (kernel time per layer; C23B: kvmix-5x 812 us, ZipCache 205 us, H200).
  timeout 100 python3 -u benches/gpu_triton.py --preset-check > "$OUT/preset-check.txt" 2>&1
  timeout 200 python3 -u gpu/sync_points.py --batch 8 --context 32768 --layers 4 --decode 4 \
    --methods zipcache kvmix-5x --top 8 > "$OUT/sync-points-decode.txt" 2>&1
  ;;
C23F)
  # Session 23, after the review (not run: the session's device time was spent): the
  # rotation memo checks shape and dtype per store and keys on the data pointer too
  # (hadamard_to takes head_dim), and hadamard_to copies from pinned memory without waiting:
  # the rotation and engine-cache CUDA tests (kvmix-5x rotates on the GPU), and the bench's
  # smoke test on CUDA. Then C23B again: kvmix-5x's prefill should show 2 synchronizing calls.
  timeout 120 python3 -m pytest -q -m cuda tests/test_rotation.py tests/test_engine_cache.py \
    > "$OUT/pytest-cuda.txt" 2>&1
  timeout 60 python3 -u -m kvmix.bench gpu --tiny --device cuda --batches 1 --contexts 256 \
    --steps 2 --methods zipcache kvmix-5x > "$OUT/bench-tiny.txt" 2>&1
  ;;
C24A)
  # Session 24, first call: C23F (the review's rotation changes on a GPU: the rotation and
  # engine-cache CUDA tests, the bench's smoke test on CUDA), then why the attend kernel takes
  # ~1.6x longer inside the model than in the kernel bench at B=8 x 32k (gpu/attend_gap.py:
  # the model's own store and call against the bench's store, one difference at a time).
  timeout 150 python3 -m pytest -q -m cuda tests/test_rotation.py tests/test_engine_cache.py \
    > "$OUT/pytest-cuda.txt" 2>&1
  timeout 60 python3 -u -m kvmix.bench gpu --tiny --device cuda --batches 1 --contexts 256 \
    --steps 2 --methods zipcache kvmix-5x > "$OUT/bench-tiny.txt" 2>&1
  (cd gpu && timeout 300 python3 -u attend_gap.py --batch 8 --context 32768) \
    > "$OUT/attend-gap.txt" 2>&1
  ;;
C24B)
  # Session 24, second call: a one-warp launch reads dense tiers (the buffer) in pages of 16
  # rows with splits of their own (C24A: the buffer's 64-row pages spilled, 209 us against
  # 122 us without them, ZipCache B8 x 32k). The attention CUDA tests, the gap again, and
  # how often a decode compiles a kernel specialization.
  timeout 150 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_contract.py > "$OUT/pytest-cuda.txt" 2>&1
  (cd gpu && timeout 200 python3 -u attend_gap.py --batch 8 --context 32768 --quick) \
    > "$OUT/attend-gap.txt" 2>&1
  (cd gpu && timeout 150 python3 -u compile_count.py --context 4096 --steps 80) \
    > "$OUT/compile-count.txt" 2>&1
  ;;
C24C)
  # Session 24, third call: the attention kernels no longer specialize on the integers that
  # move between decoding steps (C24B: ~12 s compiles at steps 0, 1, 16 and 17). How often a
  # decode compiles now, the CUDA tests of the fast launch, then the 32-layer decoding step at
  # B=8 x 32k with the buffer's 16-row pages (C24B: the kernel 134 / 199 us a layer in the
  # model, against 210 / 304 before).
  (cd gpu && timeout 120 python3 -u compile_count.py --context 4096 --steps 80) \
    > "$OUT/compile-count.txt" 2>&1
  timeout 150 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    tests/test_engine_cache.py > "$OUT/pytest-cuda.txt" 2>&1
  timeout 270 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 8 \
    --methods zipcache kvmix-5x > "$OUT/bench-32k-b8.txt" 2>&1
  ;;
C24D)
  # Session 24, last call: the dense tiers' programs taking places of the packed tiers' in
  # the split plan (C24B: 134 us in the model against 122 without the buffer's rows,
  # ZipCache B8 x 32k: one wave late?). Measured and reverted: 136 / 213 us against C24B's
  # 134 / 199 (longer packed programs). The gap, the presets against float64 and bitwise
  # against plain unpacking (buffer rows included), the attention CUDA tests.
  (cd gpu && timeout 200 python3 -u attend_gap.py --batch 8 --context 32768 --quick) \
    > "$OUT/attend-gap.txt" 2>&1
  timeout 100 python3 -u benches/gpu_triton.py --preset-check > "$OUT/preset-check.txt" 2>&1
  timeout 120 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    > "$OUT/pytest-cuda.txt" 2>&1
  ;;
C24E)
  # Session 24: fp16 dense rows (the buffer of a bf16 / fp16 model) on tensor cores in a
  # one-warp launch (offline SASS: 457 instructions a 16-row page, no stack, against 3127
  # and 296 B). The model's store against float64 (ZipCache) and the kernel per layer in the
  # model at B=8 x 32k (C24B: 134 / 199 us).
  (cd gpu && timeout 230 python3 -u attend_gap.py --batch 8 --context 32768 --quick) \
    > "$OUT/attend-gap.txt" 2>&1
  ;;
C24F)
  # Session 24, staged for the next session (its device time was spent): every CUDA test on
  # the final kernel (fp16 buffer rows on tensor cores, per-tier pages and splits, integers
  # not specialized), the 32-layer decoding step at B=8 x 32k (C24C: 31.0 / 31.3 ms before
  # the tensor-core buffer), then C23B's prefill at B=1 x 32k (kvmix-5x should make 2
  # synchronizing calls now that the rotation goes from pinned memory without waiting).
  timeout 200 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 250 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 8 \
    --methods zipcache kvmix-5x > "$OUT/bench-32k-b8.txt" 2>&1
  timeout 120 python3 -u gpu/sync_points.py --batch 1 --context 32768 --layers 2 \
    --methods zipcache kvmix-5x > "$OUT/sync-points.txt" 2>&1
  ;;
C25A)
  # Session 25: every CUDA test on main (C24F's, never run: the fast-launch test among
  # them), with the merge in one pass over a step's every split, then the merge timed at
  # the presets' B8 x 32k (session 24: 6.5 / 7.0 us a launch, ZipCache / kvmix-5x).
  timeout 220 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 300 python3 -u benches/gpu_triton.py --merge > "$OUT/merge.txt" 2>&1
  ;;
C25B)
  # Session 25: the 32-layer decoding step at B=8 x 32k (C24C: 31.0 / 31.3 ms before the
  # tensor-core buffer) with MiKV beside (its dense high tier under the one-warp launch's
  # page and split rule, never timed), then one layer's B=1 x 32k prefill step by step with
  # the kernels' device times (how much of the phase timers' 13% / 18% is the GPU's).
  timeout 360 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 8 \
    --methods zipcache kvmix-5x mikv > "$OUT/bench-32k-b8.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_steps.py --batch 1 --context 32768 --kernel-table 25 \
    > "$OUT/prefill-steps-b1.txt" 2>&1
  ;;
C25C)
  # C24F's last part: the B=1 x 32k prefill's synchronizing calls (kvmix-5x should make 2
  # now that the rotation goes from pinned memory without waiting).
  timeout 150 python3 -u gpu/sync_points.py --batch 1 --context 32768 --layers 2 \
    --methods zipcache kvmix-5x > "$OUT/sync-points.txt" 2>&1
  ;;
C25D)
  # Session 25, second call: is Nsight Compute there (the stall reasons of the field path's
  # warps; a ninth warp per SM did not help, C25A), then one layer's B=1 x 32k prefill step
  # by step with its kernels' device times.
  { command -v ncu nsys; ls /usr/local/cuda/bin 2>&1 | head -40; } > "$OUT/tools.txt" 2>&1
  if command -v ncu > /dev/null; then
    timeout 100 ncu --kernel-name regex:_attend_kernel --launch-skip 2 --launch-count 1 \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      --section SpeedOfLight python3 gpu/ncu_attend.py zipcache > "$OUT/ncu.txt" 2>&1
  fi
  timeout 150 python3 -u gpu/prefill_steps.py --batch 1 --context 32768 --kernel-table 25 \
    > "$OUT/prefill-steps-b1.txt" 2>&1
  ;;
C25E)
  # MiKV's 32-layer decoding step at B=8 x 32k (its dense high tier under the one-warp
  # launch's 16-row pages and splits, never timed).
  timeout 150 python3 -u -m kvmix.bench gpu --batches 8 --contexts 32768 --steps 6 \
    --methods mikv > "$OUT/bench-mikv.txt" 2>&1
  ;;
C26A)
  # Staged by session 25: where the field path's excess global sectors (18% of 8.47M) and its
  # stalls are, by SASS line. The report is made and queried on the lent machine (no ncu
  # here); the whole source page comes back compressed (it may pass a returned file's limit).
  timeout 200 ncu -o "$OUT/attend" --kernel-name regex:_attend_kernel --launch-skip 2 \
    --launch-count 1 --section SourceCounters --section WarpStateStats --import-source yes \
    python3 gpu/ncu_attend.py zipcache > "$OUT/ncu-run.txt" 2>&1
  timeout 120 ncu --import "$OUT/attend.ncu-rep" --page source --csv --print-source sass \
    2> "$OUT/source-err.txt" | gzip > "$OUT/source.csv.gz"
  rm -f "$OUT/attend.ncu-rep"
  ;;
C26B)
  # Staged by session 25 (its device time was spent): the field path's page loop unrolled
  # twice (`attend_tiers(unroll=2)`; offline, Triton 3.6: two-page bodies of 2894 / 2688 SASS
  # instructions for the 4- / 2-bit tiers, no spill in them) against the default at
  # B8 x 32k, ZipCache (also with 3 stages) and kvmix-5x: the outputs' largest difference,
  # then the call's time beside SDPA.
  timeout 280 python3 -u benches/gpu_triton.py --unroll > "$OUT/unroll.txt" 2>&1
  ;;
C26C)
  # Session 26: ZipCache's classification in kernels (`zipcache_rank_kernel`: scores,
  # categories and ranking keys; one sort; `mark_salient_kernel`; `partition_kernel` per
  # tier pushed to, replacing a sort, two gathers and a select each: 272 -> 225 torch ops and
  # 3 -> 1 sorts in a prefill's layer) and the fast launch calling the compiled kernel's
  # launcher directly (no runner closure, the raw stream handle). One layer's B=1 x 32k
  # prefill step by step, this tree and, as the baseline in the same call, main before the
  # change (carry/base: `git archive f5ee36b python/kvmix`, the wheel's .so copied in); then
  # the CUDA tests and the launch check (bit-identical to Triton's launch; host us per call,
  # the runner's path beside). The most wanted first: the budget may end the call.
  both prefill-steps-b1 100 python3 -u gpu/prefill_steps.py --batch 1 --context 32768 --reps 5
  timeout 200 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  timeout 120 python3 -u gpu/launch_check.py > "$OUT/launch-check.txt" 2>&1
  ;;
C26E)
  # Session 26, C26C cut to the device time left (~180 s): the new kernels compiled and
  # checked on the GPU (the partition against a stable sort; ZipCache's store against the
  # Rust store at the contract's CUDA size), then the B=1 x 32k prefill steps, this tree
  # and main before (carry/base).
  timeout 70 python3 -m pytest -q -m cuda tests/test_triton_partition.py \
    tests/test_engine_contract.py -k "partition or (zipcache and config0)" > "$OUT/pytest-cuda.txt" 2>&1
  both prefill-steps-b1 50 python3 -u gpu/prefill_steps.py --batch 1 --context 32768 --reps 3
  ;;
C26D)
  # Session 26, after C26C: a decoding step's host work (`kvmix.bench host`, B=1 x 8k, the
  # 32-layer model) with this tree's direct launch and ZipCache's kernels, and main before
  # them (carry/base) as the baseline in the same call.
  both host-b1-8k 200 python3 -u -m kvmix.bench host --context 8192 --batch 1 --steps 8 \
    --methods full zipcache
  ;;
C27A)
  # Session 27: every CUDA test on this tree (session 26's classification kernels and direct
  # launch never ran on a GPU; the field path's partial outputs now stored in channel order,
  # a row at a time), the kernel at B8 x 32k this tree vs main before the store change
  # (carry/base-kernel: `git archive 9fabcbb python/kvmix`), then the B=1 x 32k prefill
  # steps vs main before session 26 (carry/base: f5ee36b) and the launch check.
  timeout 170 python3 -m pytest -q -m cuda tests > "$OUT/pytest-cuda.txt" 2>&1
  BASE=carry/base-kernel both kernel 75 python3 -u benches/gpu_triton.py --current
  both prefill-steps-b1 60 python3 -u gpu/prefill_steps.py --batch 1 --context 32768 --reps 3
  timeout 60 python3 -u gpu/launch_check.py > "$OUT/launch-check.txt" 2>&1
  ;;
C27B)
  # Session 27, after C27A: the issue's kernel command (`kvmix.bench attention --device
  # cuda`: its table and verdicts, never run on a GPU before), then a decoding step's host
  # work at B=1 x 8k (the 32-layer model) with session 26's direct launch and classification
  # kernels against main before them (carry/base: f5ee36b) in the same call.
  timeout 150 python3 -u -m kvmix.bench attention --device cuda --batch 1 8 \
    --tokens 8192 32768 --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  both host-b1-8k 110 python3 -u -m kvmix.bench host --context 8192 --batch 1 --steps 8 \
    --methods full zipcache
  ;;
C28A)
  # Staged by session 27 (its device time was spent): the issue's kernel command with its
  # new GPU-time columns and the kernel's own error (never run so), a decoding step's host
  # work with the direct launches counted, and the B=1 x 32k prefill of 8 layers (end to end
  # and by the phase timers) with session 26's classification kernels, all three presets.
  timeout 150 python3 -u -m kvmix.bench attention --device cuda --batch 1 8 \
    --tokens 8192 32768 --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  timeout 80 python3 -u -m kvmix.bench host --context 8192 --batch 1 --steps 8 \
    --methods full zipcache > "$OUT/host-b1-8k.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  ;;
C28B)
  # Session 28: the field path's page loop without the values' [VG, N] reshape (one value
  # group: scales and offsets as vectors in the probabilities' layout; offline 2-bit 1196 ->
  # 1122 SASS a page) and with kvmix-5x's 3-bit key rows read as 32-bit words (async
  # copies; 1534 -> 1279 with both), this tree vs session 27's main (carry/base-kernel: `git archive
  # c0f71c9 python/kvmix`) at B8 x 32k, with the int8 key dots (`int8_keys=True`) timed
  # beside the default, then the issue's kernel command with its GPU-time columns (never
  # run so).
  BASE=carry/base-kernel both kernel 170 python3 -u benches/gpu_triton.py --current
  timeout 150 python3 -u -m kvmix.bench attention --device cuda --batch 1 8 \
    --tokens 8192 32768 --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  ;;
C28C)
  # Session 28, after C28B: C28A's other two parts (a decoding step's host work with the
  # direct launches counted; the B=1 x 32k prefill of 8 layers, three presets).
  timeout 80 python3 -u -m kvmix.bench host --context 8192 --batch 1 --steps 8 \
    --methods full zipcache > "$OUT/host-b1-8k.txt" 2>&1
  timeout 200 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  ;;
C29A)
  # Session 29: every CUDA test on session 28's kernels (3-bit words, one value group's
  # vectors, int8 key dots; never run on a GPU), then the kernel at B8 x 32k with the int8
  # key dots' query digits stacked so that their operand loads are vectors (offline 2-bit
  # 1068 -> 967 SASS a page, default 1122), timed beside the default in the same process.
  timeout 260 python3 -m pytest -q -m cuda tests -p no:cacheprovider \
    > "$OUT/pytest-cuda.txt" 2>&1
  timeout 200 python3 -u benches/gpu_triton.py --current > "$OUT/kernel.txt" 2>&1
  ;;
C29B)
  # Session 29: C28C (a decoding step's host work; the B=1 x 32k prefill of 8 layers, three
  # presets) and the issue's kernel command.
  timeout 70 python3 -u -m kvmix.bench host --context 8192 --batch 1 --steps 8 \
    --methods full zipcache > "$OUT/host-b1-8k.txt" 2>&1
  timeout 190 python3 -u gpu/prefill_profile.py --layers 8 --scoring triton --skip-every-row \
    --methods full zipcache kvmix-5x --batch 1 --repeats 3 > "$OUT/prefill-profile-b1.txt" 2>&1
  timeout 150 python3 -u -m kvmix.bench attention --device cuda --batch 1 8 \
    --tokens 8192 32768 --json "$OUT/attention.json" > "$OUT/attention.txt" 2>&1
  ;;
C29C)
  # Session 29's last call: every CUDA test with int8 key dots as the default and a
  # program's first run skipping the values' fold, then the kernel at B8 x 32k (default
  # against fp16 key fields in the same process).
  timeout 190 python3 -m pytest -q -m cuda tests -p no:cacheprovider \
    > "$OUT/pytest-cuda.txt" 2>&1
  timeout 180 python3 -u benches/gpu_triton.py --current > "$OUT/kernel.txt" 2>&1
  ;;
C29D)
  # C29C's kernel part alone (the device time left in session 29 allowed one short call):
  # the device checks of both key paths and the timing at B8 x 32k.
  timeout 200 python3 -u benches/gpu_triton.py --current > "$OUT/kernel.txt" 2>&1
  ;;
C29E)
  # Session 29, the device time left (~400 s with the start): the presets' device checks of
  # both key paths with int8 key dots as the default and the first run's fold skipped, then
  # as much of the B8 x 32k timing as the limit lets run.
  timeout 100 python3 -u -c "import sys; sys.path.insert(0, 'benches'); import gpu_triton as g
a = g.load_attention('cuda'); g.preset_check(a); g.preset_check(a, int8_keys=False)" \
    > "$OUT/check.txt" 2>&1
  timeout 150 python3 -u benches/gpu_triton.py --current > "$OUT/kernel.txt" 2>&1
  ;;
C30A)
  # Session 30: the issue's end-to-end table at 32k on the current tree (the README's is
  # session 10's): B=1 and 8, DynamicCache, QuantizedCache int4/int2, the two fused presets.
  # DynamicCache's B=8 x 32k peak (~86 GB) needs an H200.
  timeout 570 python3 -u -m kvmix.bench gpu --contexts 32768 --batches 1 8 --steps 6 \
    --methods full quanto-int4 quanto-int2 zipcache kvmix-5x --json "$OUT/bench-32k.json" \
    > "$OUT/bench-32k.txt" 2>&1
  ;;
C30B)
  # Session 30: the same at 8k, the portable paths too.
  timeout 400 python3 -u -m kvmix.bench gpu --contexts 8192 --batches 1 8 --steps 8 \
    --methods full quanto-int4 quanto-int2 zipcache kvmix-5x zipcache-portable \
    --json "$OUT/bench-8k.json" > "$OUT/bench-8k.txt" 2>&1
  ;;
C30C)
  # Session 30: registers against programs at B8 x 32k on the H200 (the kernel is latency
  # bound there: 92.6 us against a 47 us bound).
  timeout 300 python3 -u benches/gpu_triton.py --reg-sweep > "$OUT/reg-sweep.txt" 2>&1
  ;;
C30D)
  # Session 30: a launch per tier against the one launch (the instruction cache), B8 x 32k,
  # with the device check of the per-tier launches against float64.
  timeout 240 python3 -u benches/gpu_triton.py --tier-sweep > "$OUT/tier-sweep.txt" 2>&1
  ;;
C30E)
  # C30D's timing alone (session 30's last device time): the one launch against a launch per
  # tier, B8 x 32k, both presets.
  timeout 170 python3 -u -c "import sys; sys.path.insert(0, 'benches'); import gpu_triton as g
a = g.load_attention('cuda'); bw = g.copy_bandwidth(); print(bw)
v = [('default', {}, True), ('per tier', {'tier_launches': True}, True)]
[g.case(a, bw, n, 8, 32768, v) for n in ('zipcache', 'kvmix-5x')]" > "$OUT/tier-sweep.txt" 2>&1
  ;;
# Session 31's C31A-C31C timed the value fields as fp16 subnormals (`subnormal_values`, removed
# after: 1.5e-4 from float64 on an H100) through `gpu_triton.py --subnormal`; they are in
# `git show e565949:gpu/pending.sh`. What stays runnable:
C31B)
  # How the tensor cores treat fp16 subnormal inputs in a dot (one product at a time, then a
  # small product beside a large one).
  timeout 60 python3 -u gpu/subnormal_probe.py > "$OUT/probe.txt" 2>&1
  ;;
C31D)
  # Session 31: the issue's end-to-end bench at B=1 x 32k on the current tree, where an H100
  # holds DynamicCache (B=8 x 32k needs an H200: C30A).
  timeout 300 python3 -u -m kvmix.bench gpu --contexts 32768 --batches 1 --steps 6 \
    --methods full quanto-int4 quanto-int2 zipcache kvmix-5x --json "$OUT/bench-32k-b1.json" \
    > "$OUT/bench-32k-b1.txt" 2>&1
  ;;
C32A)
  # Session 32: the merge and received kernels as programmatic dependent launches (then the
  # default from sm_90; run at c513bc1): their CUDA test (bit for bit against ordinary
  # launches, eager and in a CUDA graph), then the kernel at B8 x 32k with and without them.
  # No faster (H100: ZipCache 102 / 102 us, kvmix-5x 118 / 119): removed after this run.
  timeout 150 python3 -m pytest -q -m cuda tests/test_triton_attention.py \
    > "$OUT/pytest-cuda-attention.txt" 2>&1
  timeout 330 python3 -u benches/gpu_triton.py --current > "$OUT/current.txt" 2>&1
  ;;
C32B)
  # Session 32: why a B=1 step at 32k takes twice the 8k one for ZipCache (51.6 against
  # 26.7 ms) while DynamicCache's barely moves: each step's wall and GPU time, CPU ops and the
  # host's Python under cProfile, at 8k and 32k.
  timeout 250 python3 -u gpu/step_profile.py --contexts 32768 8192 --steps 4 \
    --methods zipcache full > "$OUT/step-profile.txt" 2>&1
  ;;
C32C)
  # Session 32, not run: why QuantizedCache int4 stepped 1.5x faster than ZipCache at B=1 x
  # 32k (call 2) where session 30 had them equal at 8k on another host: both caches at 8k and
  # 32k in one process, by the bench and by the step profile (host Python, launches).
  timeout 250 python3 -u -m kvmix.bench gpu --contexts 8192 32768 --batches 1 --steps 6 \
    --methods quanto-int4 zipcache > "$OUT/bench-b1.txt" 2>&1
  timeout 300 python3 -u gpu/step_profile.py --contexts 8192 32768 --steps 4 \
    --methods quanto-int4 zipcache > "$OUT/step-profile.txt" 2>&1
  ;;
C32D)
  # Session 32 (run in session 33, at 7e719d7, where `gpu/raw_pointers.py` and the flag
  # KVMIX_TRITON_RAW_POINTERS were; both removed after it): the direct launch with device
  # tensors as their addresses. Bit for bit the same, and no faster (212.5 / 212.9 us an
  # eager call).
  timeout 100 python3 -u gpu/raw_pointers.py > "$OUT/raw-pointers.txt" 2>&1
  KVMIX_TRITON_RAW_POINTERS=1 timeout 60 python3 -m pytest -q -m cuda \
    tests/test_triton_attention.py -k "fast_launch or raw_pointer" > "$OUT/pytest-raw.txt" 2>&1
  ;;
C33A)
  # Session 33: where an eager attention call's host time goes (B=1 x 8k: kvmix's Python,
  # Triton's launcher, its C launch; SDPA for scale), and kvmix's functions in a B=1 step.
  timeout 150 python3 -u gpu/launch_cost.py > "$OUT/launch-cost.txt" 2>&1
  timeout 200 python3 -u gpu/step_profile.py --contexts 8192 --steps 4 --top 14 \
    --methods zipcache full > "$OUT/step-profile.txt" 2>&1
  ;;
C33B)
  # Session 33: the merge in the attend launch (`attend_tiers(fused_merge=True)`, opt-in):
  # its CUDA tests (the race: 50 calls and a CUDA graph bit for bit), the float64 check of
  # both presets with it and the kernel at B8 x 32k beside the merge launch
  # (`gpu_triton.py --fused`), the B=1 eager call's host time.
  timeout 70 python3 -m pytest -q -m cuda tests/test_triton_attention.py -k "fused" \
    > "$OUT/pytest-fused.txt" 2>&1
  timeout 170 python3 -u benches/gpu_triton.py --fused > "$OUT/fused.txt" 2>&1
  timeout 45 python3 -u gpu/launch_cost.py > "$OUT/launch-cost.txt" 2>&1
  ;;
C34A)
  # Session 34: C33B's race test, then the kernel as `--current` times it (the default
  # beside the fused merge, both checked against float64 first) and the B=1 eager call's
  # host time: one call that serves on an H100 (kvmix-5x's 3x SDPA) or an H200 (the kernel
  # targets there, last measured in session 30).
  timeout 70 python3 -m pytest -q -m cuda tests/test_triton_attention.py -k "fused" \
    > "$OUT/pytest-fused.txt" 2>&1
  timeout 400 python3 -u benches/gpu_triton.py --current > "$OUT/current.txt" 2>&1
  timeout 45 python3 -u gpu/launch_cost.py > "$OUT/launch-cost.txt" 2>&1
  ;;
C35A)
  # Session 35: the fused merge slowed the attend kernel at B=8 x 32k (GPU time) and cut the
  # B=1 call's host time (C34A on an H100): whole decoding steps with each, one cache.
  timeout 170 python3 -u gpu/fused_merge_e2e.py --rounds 4 --shapes 1x8192 8x8192 1x32768 8x32768 > "$OUT/fused-merge-e2e.txt" 2>&1
  ;;
C35B)
  # Session 35: the capacity target (>= 4x DynamicCache's largest batch at 32k) was last
  # searched in session 11 (H200: ZipCache 116, kvmix-5x 120 against 30). The same searches on
  # the current tree; on an H100 the batches are smaller, the ratio is what the target asks.
  timeout 400 python3 -u -m kvmix.bench gpu --max-batch --max-batch-chunk 2048 --batches 1 \
    --contexts 1024 --steps 2 --methods full zipcache kvmix-5x --json "$OUT/capacity.json" \
    > "$OUT/capacity.txt" 2>&1
  ;;
C35)
  # C35A then C35B in one call (machines came rarely in sessions 33-35: one start for both).
  timeout 170 python3 -u gpu/fused_merge_e2e.py --rounds 4 --shapes 1x8192 8x8192 1x32768 8x32768 \
    > "$OUT/fused-merge-e2e.txt" 2>&1
  timeout 400 python3 -u -m kvmix.bench gpu --max-batch --max-batch-chunk 2048 --batches 1 \
    --contexts 1024 --steps 2 --methods full zipcache kvmix-5x --json "$OUT/capacity.json" \
    > "$OUT/capacity.txt" 2>&1
  ;;
V)
  # Session 18: the decoding step after the append kernel's change (a step is its n = 1
  # case), B=8 x 8k on the 32-layer model, beside DynamicCache in the same process.
  timeout 260 python3 -u -m kvmix.bench gpu --batches 8 --contexts 8192 --steps 8 \
    --methods full zipcache kvmix-5x > "$OUT/bench-8k-b8.txt" 2>&1
  ;;
*)
  echo "usage: bash gpu/pending.sh A|B|...|R|U|V|X|Y|X2|X3|P2|C20|C21|C21S|C22|C22S|C22K|C23|C23B|C23C|C23D|C23E|C23F|C24A|C24B|C24C|C24D|C24E|C24F|C25A|C25B|C25C|C25D|C25E|C26A|C26B|C26C|C26D|C26E|C27A|C27B|C28A|C28B|C28C|C29A|C29B|C29C|C29D|C29E|C30A|C30B|C30C|C30D|C30E|C31B|C31D|C32A|C32B|C32C|C32D|C33A|C33B|C34A|C35|C35A|C35B" >&2
  exit 2
  ;;
esac
tail -n 5 "$OUT"/*.txt
