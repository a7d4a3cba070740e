#!/usr/bin/env bash
# On the near-edge machine (an NVIDIA GPU, askexpert installed: ./scripts/setup.sh): time a
# system's generalist and expert on the GPU over batch sizes 1…64, read NVML's energy counter
# around each batch size, write a measured near-edge profile, then run the testbed with it.
#   scripts/near-edge-gpu-profile.sh SYSTEM_DIR [PROFILE_OUT]
# Idle watts: NVML's power draw read now (run it on an idle GPU); active watts: the enforced
# power limit. Commit the profile with the card and the date in its name.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
system=${1:?usage: scripts/near-edge-gpu-profile.sh SYSTEM_DIR [PROFILE_OUT]}
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this script needs an NVIDIA GPU" >&2; exit 2; }
query() { nvidia-smi --query-gpu="$1" --format=csv,noheader,nounits | head -1 | tr -d ' '; }
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
idle_w=$(query power.draw)
active_w=$(query power.limit)
slug=$(echo "$card" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
name="${slug}-measured-$(date -u +%Y-%m-%d)"
out=${2:-src/askexpert/measure/profiles/${name}.yaml}
echo "card: $card; idle ${idle_w} W, power limit ${active_w} W; profile: $out"
askexpert=${ASKEXPERT:-.venv/bin/askexpert}
"$askexpert" profile measure --system "$system" --device cuda --tier near-edge --name "$name" \
  --idle-w "$idle_w" --active-w "$active_w" --out "$out"
"$askexpert" testbed --system "$system" --near-edge "$out" --samples 500
