#!/bin/bash
# Train on a SLURM cluster until the run is done, across time limits and preemptions: every start of the job runs
# the same command, with --resume (docs/cluster.md).
#
#   sbatch --nodes=4 docs/slurm.sh --dataset data/imagenet-latents.npz     # ImageNet-256: 4 nodes of 8 GPUs
#   sbatch --nodes=1 docs/slurm.sh --dataset cifar10 --precision bf16       # CIFAR-10 on one node
#
# Ten minutes before the time limit SLURM sends SIGUSR1 to this script. It passes SIGTERM on to srun, which signals
# every torchrun and every worker; the ranks finish the step they are in and stop together, rank 0 writes ckpt.pt,
# and once they have all exited the script requeues the job. The requeued job runs this script again, with the same
# arguments: --resume continues from runs/<name>/ckpt.pt, or starts the run where there is none yet. A job that SLURM
# requeues by itself (a preemption, a node failure: --requeue) starts the same way.
#SBATCH --job-name=imm
#SBATCH --ntasks-per-node=1         # one torchrun per node; it starts one worker per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600         # SIGUSR1 to this script (B: the batch shell only) 600 s before the time limit
#SBATCH --requeue                   # the job may be requeued: by SLURM after a preemption, by this script below
#SBATCH --open-mode=append          # a requeued job appends to the same output file
#SBATCH --output=slurm-%x-%j.out

# torchrun forwards SIGTERM to its workers, then kills them after this many seconds (30 by default): long enough to
# write the largest checkpoint (DiT-XL/2 with AdamW: 10.8 GB) to the shared file system.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:${MASTER_PORT:-29500}" --rdzv_id="$SLURM_JOB_ID" \
    train.py "$@" --resume &
training=$!

time_is_up() {
    kill -TERM "$training"             # srun passes it on to torchrun and the workers
    wait "$training"                   # until rank 0 has written ckpt.pt (torchrun itself exits non-zero on a signal)
    scontrol requeue "$SLURM_JOB_ID"
}
trap time_is_up USR1
wait "$training"                                           # returns at once when SIGUSR1 arrives: time_is_up runs
