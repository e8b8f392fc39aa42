#!/usr/bin/env bash
# The two-GPU runs of docs/BENCHMARKS.md, in parts that each fit in ten minutes on a 2 x H200 host.
#   bash bench/multi_gpu.sh t2i      OUT  # link speed; T2I 1 GPU vs 2 (DDP); checkpoints 2->1 and 1->2 GPUs
#   bash bench/multi_gpu.sh t2i-more OUT  # T2I on 2 GPUs under torchrun (DDP) and with FSDP
#   bash bench/multi_gpu.sh psvae    OUT  # PS-VAE stage 2 on 1 and 2 GPUs (DDP)
#   bash bench/multi_gpu.sh t2i-ddp  OUT  # T2I 1 GPU vs 2 (DDP) side by side, no checkpoints
#   bash bench/multi_gpu.sh t2i-check OUT # 1 GPU at another micro-batch split (the rounding baseline
#                                         # of the loss curves); FSDP and 1 GPU side by side
#   bash bench/multi_gpu.sh fsdp     OUT  # T2I 653M at the paper's micro-batch 46: 1 GPU vs 2 with FSDP
#   bash bench/multi_gpu.sh fsdp-1708m OUT # the same for the 1708M preset (its micro-batch 23)
# NVLink multicast stays off (it can take a shared host's GPUs down).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
part=$1 out=$2 work=${WORK:-/tmp/psvae_multi}
mkdir -p "$out" "$work"
t2i() { timeout "$1" python3 bench/t2i_multi.py --work "$work" --batch 184 --micro 46 "${@:2}"; }
if [ "$part" = t2i ]; then
  nvidia-smi topo -m > "$out/topology.txt" 2>&1
  timeout 120 python3 -m torch.distributed.run --nproc_per_node=2 bench/allreduce_bw.py --out "$out/allreduce.json"
  t2i 230 --processes 1 --steps 20 --checkpoint-every 10 --out "$out/t2i_1gpu.json"
  t2i 150 --processes 2 --steps 20 --checkpoint-every 10 --out "$out/t2i_2gpu_ddp.json"
  t2i 110 --processes 1 --steps 20 --name t2i_2to1 --resume "$work/runs/t2i_2gpu_accelerate/checkpoints/step_00000010" --out "$out/t2i_2to1.json"
  t2i 110 --processes 2 --steps 20 --name t2i_1to2 --resume "$work/runs/t2i_1gpu_accelerate/checkpoints/step_00000010" --out "$out/t2i_1to2.json"
elif [ "$part" = t2i-more ]; then
  t2i 250 --processes 2 --steps 30 --launcher torchrun --out "$out/t2i_2gpu_torchrun.json"
  t2i 200 --processes 2 --steps 30 --fsdp --out "$out/t2i_2gpu_fsdp.json"
elif [ "$part" = t2i-ddp ]; then
  t2i 120 --processes 1 --steps 20 --out "$out/t2i_1gpu.json"
  t2i 100 --processes 2 --steps 20 --out "$out/t2i_2gpu_ddp.json"
elif [ "$part" = t2i-check ]; then
  t2i 200 --processes 1 --steps 15 --micro 23 --name t2i_1gpu_micro23 --out "$out/t2i_1gpu_micro23.json"
  t2i 150 --processes 2 --steps 30 --fsdp --out "$out/t2i_2gpu_fsdp.json"
  t2i 150 --processes 1 --steps 30 --out "$out/t2i_1gpu.json"
elif [ "$part" = fsdp ]; then
  t2i 200 --processes 1 --steps 30 --out "$out/t2i_1gpu.json"
  t2i 200 --processes 2 --steps 30 --fsdp --out "$out/t2i_2gpu_fsdp.json"
elif [ "$part" = fsdp-1708m ]; then
  big=(--batch 92 --micro 23 --steps 20 --extra model.preset=paper-1708m)
  t2i 270 --processes 1 "${big[@]}" --name t2i_1708m_1gpu --out "$out/t2i_1708m_1gpu.json"
  t2i 270 --processes 2 "${big[@]}" --fsdp --name t2i_1708m_2gpu_fsdp --out "$out/t2i_1708m_2gpu_fsdp.json"
else
  timeout 330 python3 bench/psvae_stage2.py --work "$work/psvae" --steps 80 --no-flops --out "$out/psvae_1gpu.json"
  timeout 200 python3 bench/psvae_stage2.py --work "$work/psvae" --steps 80 --no-flops --processes 2 --out "$out/psvae_2gpu.json"
fi
