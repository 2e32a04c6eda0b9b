#!/usr/bin/env bash
# Two machines on one host: the multi-node launch (static rendezvous, --num_machines 2, --machine_rank 0 and 1,
# main process at 127.0.0.1) as two `accelerate launch` commands on this machine's CPUs over gloo, each "machine"
# with PROCESSES_PER_MACHINE processes. It checks a multi-node setup without a second machine; on real machines run
# the same launch with your config (recipes/accelerate/multi_node.yaml) once on each, changing only --machine_rank.
#
#   recipes/accelerate/two_machines_one_host.sh recipes/tiny.yaml --model_name_or_path DIR --output_dir outputs/two
#
# Environment: PORT (29500) of the main process, TIMEOUT (60) seconds a machine waits for the other to join before it
# stops with an error (the rendezvous timeout, `--rdzv_conf timeout=`), PROCESSES_PER_MACHINE (1), MACHINES ("0 1":
# which machine ranks to start; "0" alone shows the error when the other never joins).
# Exit status: 0 when every machine's launch succeeded, else the first failure's.
set -uo pipefail
PORT="${PORT:-29500}" TIMEOUT="${TIMEOUT:-60}" PROCESSES_PER_MACHINE="${PROCESSES_PER_MACHINE:-1}"
MACHINES="${MACHINES:-0 1}"
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

pids=()
for rank in $MACHINES; do
    python -m accelerate.commands.launch --multi_gpu --num_machines 2 --machine_rank "$rank" \
        --num_processes $((2 * PROCESSES_PER_MACHINE)) --main_process_ip 127.0.0.1 --main_process_port "$PORT" \
        --rdzv_backend static --rdzv_conf "timeout=$TIMEOUT" --mixed_precision no --dynamo_backend no \
        -m tempflow.cli train "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || { code=$?; [[ $status -eq 0 ]] && status=$code; }
done
exit "$status"
