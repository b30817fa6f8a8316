#!/usr/bin/env bash
# One manifest over a Slurm job array: each array task narrates one shard of the rows.
#
#   sbatch jobs/slurm-array.sh                     # from the project folder, on a shared filesystem
#   sbatch jobs/slurm-array.sh --max-cost 20       # extra flags go to `batchtts run`
#   batchtts status out/dataset                    # all shards, merged, while it runs or after
#   batchtts export out/dataset                    # one results.parquet for the whole manifest
#
# batchtts reads SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (minus SLURM_ARRAY_TASK_MIN), so
# --array=0-7 makes 8 shards. Each shard keeps its own ledger (out/dataset/ledger-shard-0003-of-0008.sqlite)
# and lock; rows go to shards by a hash of their key, so a shard keeps its rows when the manifest
# grows. Submitting the same array again resumes every shard. Keep the number of tasks for a manifest:
# another count would put rows in other ledgers, so batchtts refuses it. To rerun one task alone, name
# its shard, since an array of one task is no split at all:
#   sbatch --array=5 jobs/slurm-array.sh --shard 5/8
#
# The key comes from the environment sbatch was called in (export OPENROUTER_API_KEY first).
#SBATCH --job-name=batchtts
#SBATCH --array=0-7
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --time=04:00:00
#SBATCH --output=batchtts-%A_%a.log
set -euo pipefail

job_file=${BATCHTTS_JOB:-jobs/dataset.toml}
# End within the Slurm time limit with everything recorded, rather than be killed at it.
max_runtime=${BATCHTTS_MAX_RUNTIME:-3h50m}

exec batchtts run "$job_file" --max-runtime "$max_runtime" "$@"
