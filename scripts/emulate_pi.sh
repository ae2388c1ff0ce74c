#!/usr/bin/env bash
# Raspberry Pi 3B+ / 4 / 5 cores under QEMU user emulation: does the Pi guide's install import,
# train, measure and join a federation? About 25 min from scratch (2-core x86 host); not in CI.
#
#   sudo bash scripts/emulate_pi.sh                      # everything; table -> benchmarks/results/pi_emulation.txt
#   sudo bash scripts/emulate_pi.sh --torch 2.10.0 --no-federation --no-measure --out /tmp/t.txt   # probes only
#
# 1. binfmt: qemu-user-static for aarch64 (apt), binfmt_misc mounted and qemu-aarch64 enabled;
# 2. an arm64 Debian bookworm rootfs by debootstrap (--foreign, second stage under QEMU), cached
#    in $FL_PI_CACHE (default /var/tmp/fl-app-pi; refused unless owned by root and writable by root
#    alone: scripts/root_cache.py);
# 3. aarch64 wheels downloaded NATIVELY (pip --platform manylinux_2_28_aarch64 --python-version 3.11)
#    and unpacked natively with `pip install --target` (no code runs at install; pip under QEMU
#    takes ~8 min): the client's dependencies exactly as deploy/raspberry-pi/README.md installs them
#    (flwr, torch, numpy, psutil; no torchvision), torch in its own folder per version;
# 4. every emulated process runs in its own mount namespace: /proc, /dev and the repository
#    (read-only, at /opt/fl-app) mounted into the rootfs, a Pi's /proc/cpuinfo bound over the
#    rootfs's (QEMU shows the host's x86 one, and PyTorch's CPU detection needs an ARM one),
#    QEMU_CPU=cortex-a53 (Pi 3B+) / cortex-a72 (Pi 4) / cortex-a76 (Pi 5);
# 5. per core: `import torch` time, multi-threaded matmul with and without the app's
#    fl_app.cpu_safety decision, one training step of the app's cnn, `python -m fl_app.measure`;
# 6. a SuperLink on this host (native) and three emulated SuperNodes (a53, a72, a76) with the
#    Pi profiles: a 1-round run (scripts/emulate_pi.py).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FL_PI_CACHE:-/var/tmp/fl-app-pi}
TORCH=2.9.1
FEDERATION=1
MEASURE_CMD=1
PROBE=1
OUT=$REPO/benchmarks/results/pi_emulation.txt
while [ $# -gt 0 ]; do
  case $1 in
    --torch) TORCH=$2; shift 2 ;;
    --no-federation) FEDERATION=0; shift ;;
    --no-measure) MEASURE_CMD=0; shift ;;
    --no-probe) PROBE=0; MEASURE_CMD=0; shift ;;   # the federation only
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
# Root chroots into and runs what the cache holds: refuse a folder someone else owns or may write to.
python3 "$REPO/scripts/root_cache.py" "$CACHE" || exit 1
ROOT=$CACHE/rootfs
SITE=/opt/fl-pi            # inside the rootfs
PLAT=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
      --platform linux_aarch64 --only-binary=:all: --python-version 3.11 --implementation cp)
say() { echo "[emulate-pi $(date +%H:%M:%S)] $*"; }
T0=$(date +%s)

# 1. binfmt
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing qemu-user-static binfmt-support debootstrap"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static binfmt-support debootstrap
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64

# 2. rootfs
if [ ! -e "$ROOT/.fl-app-stage2-done" ]; then
  rm -rf "$ROOT"
  MIRROR=$(python3 -c "import sys; sys.path.insert(0, '$REPO/scripts'); from compose_federation import apt_mirror; print(apt_mirror())")
  say "debootstrap arm64 bookworm (first stage natively, second under QEMU: ~8 min)"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,ca-certificates bookworm "$ROOT" "$MIRROR"
  cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
  chroot "$ROOT" /debootstrap/debootstrap --second-stage
  touch "$ROOT/.fl-app-stage2-done"
fi

# 3. wheels, downloaded and unpacked natively
install_target() {  # dir, wheel folder, pip args...
  local dir=$1 wheels=$2; shift 2
  if [ ! -e "$ROOT$SITE/$dir/.done" ]; then
    mkdir -p "$CACHE/$wheels"
    pip download -q --no-cache-dir -d "$CACHE/$wheels" "${PLAT[@]}" "$@"
    rm -rf "${ROOT:?}$SITE/$dir"
    pip install -q --no-index --find-links "$CACHE/$wheels" --target "$ROOT$SITE/$dir" "${PLAT[@]}" "$@"
    if [ -d "$ROOT$SITE/$dir/bin" ]; then  # console scripts: the rootfs's python, not this host's
      sed -i '1s|^#!.*python.*$|#!/usr/bin/python3|' "$ROOT$SITE/$dir"/bin/*
    fi
    touch "$ROOT$SITE/$dir/.done"
  fi
}
# torch's own dependency markers would be judged on this x86 host (pip evaluates them natively and
# would pull CUDA wheels for an x86 machine): torch without dependencies, its pure-Python ones listed.
say "aarch64 wheels: flwr 1.41.0, numpy, psutil (common) and torch==$TORCH"
install_target common wheels-common flwr==1.41.0 "numpy>=1.26,<3" "psutil>=5.9" filelock typing-extensions \
  sympy networkx jinja2 fsspec
install_target "torch-$TORCH" "wheels-$TORCH" --no-deps "torch==$TORCH"
# Byte-code compiled natively (a .pyc is the same on every platform; compiling under QEMU at every
# import made `import torch` take a minute and the first device query outlast the server's 120 s).
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  python3 -m compileall -q -j 2 "$ROOT$SITE/common" "$ROOT$SITE/torch-$TORCH" "$ROOT/usr/lib/python3.11" >/dev/null 2>&1 || true
fi
TORCH_MB=$(du -sm "$ROOT$SITE/torch-$TORCH" | cut -f1)
WHEEL_MB=$(du -sm "$CACHE/wheels-$TORCH" | cut -f1)
mkdir -p "$ROOT/opt/fl-app" "$ROOT/tmp"

# 4. one emulated process: pi_exec CORE CPUINFO CMD...
cpuinfo_for() {  # the Features line a real board's 64-bit kernel prints, and the CPU part
  local core=$1 features part variant revision model
  case $core in
    cortex-a53) features="fp asimd evtstrm crc32 cpuid"; part=0xd03; variant=0x0; revision=4
                model="Raspberry Pi 3 Model B Plus Rev 1.3" ;;
    cortex-a72) features="fp asimd evtstrm crc32 cpuid"; part=0xd08; variant=0x0; revision=3
                model="Raspberry Pi 4 Model B Rev 1.4" ;;
    cortex-a76) features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
                part=0xd0b; variant=0x4; revision=1; model="Raspberry Pi 5 Model B Rev 1.0" ;;
  esac
  for i in 0 1 2 3; do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' \
      "$i" "$features" "$variant" "$part" "$revision"
  done
  printf 'Revision\t: 000000\nSerial\t\t: 0000000000000000\nModel\t\t: %s\n' "$model"
}
WORK=$(mktemp -d /tmp/fl-emulate-pi.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
for core in cortex-a53 cortex-a72 cortex-a76; do cpuinfo_for $core > "$WORK/cpuinfo-$core"; done
cat > "$WORK/pi_exec" <<EOF
#!/usr/bin/env bash
# pi_exec CORE CMD...: run CMD in the arm64 rootfs as that emulated core, in a private mount namespace.
core=\$1; shift
exec unshare -m --propagation private bash -c '
  set -e; R=$ROOT
  mount -t proc proc \$R/proc
  mount --bind $WORK/cpuinfo-'"\$core"' \$R/proc/cpuinfo
  mount --rbind /dev \$R/dev
  mount --bind $REPO \$R/opt/fl-app && mount -o remount,bind,ro \$R/opt/fl-app
  export QEMU_CPU='"\$core"' PYTHONPATH=/opt/fl-app/scripts/pi_sitecustomize:$SITE/torch-$TORCH:$SITE/common:/opt/fl-app PATH=$SITE/common/bin:/usr/bin:/bin
  export HOME=/tmp FLWR_HOME=/tmp/flwr-home-'"\$core"'
  exec /usr/sbin/chroot \$R "\$@"' pi_exec "\$@"
EOF
chmod +x "$WORK/pi_exec"

# 5. probes per core
cat > "$WORK/probe.py" <<'EOF'
import json, subprocess, sys, time
t = time.perf_counter()
try:
    import torch
except Exception as exc:  # noqa: BLE001
    print(json.dumps({"import": f"failed: {exc}"})); sys.exit(0)
out = {"torch": torch.__version__, "import_s": round(time.perf_counter() - t, 1), "threads": torch.get_num_threads()}
# A matmul on 2 threads, WITHOUT the app's decision, in a child (a SIGILL kills only the child).
mm = "import torch; torch.set_num_threads(2); a = torch.randn(256, 256); print(float((a @ a).sum()))"
out["matmul_2_threads"] = {0: "ok", -4: "SIGILL"}.get(subprocess.run([sys.executable, "-c", mm],
                                                      capture_output=True).returncode, "crashed")
from fl_app import cpu_safety
out["cpu_safety"] = cpu_safety.apply() and "1 thread" or "unchanged"
from fl_app.models import ModelSpec, build_model
model = build_model(ModelSpec("cnn"))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
steps = []
for _ in range(3):
    t = time.perf_counter()
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    steps.append(time.perf_counter() - t)
out["train_step_s"] = round(min(steps[1:]), 2)
print(json.dumps(out))
EOF
cp "$WORK/probe.py" "$ROOT/tmp/probe.py"
declare -A PROBE MEASURE
for core in cortex-a53 cortex-a72 cortex-a76; do
  if [ "$PROBE" = 0 ]; then echo '{"import": "not run"}' > "$WORK/probe-$core.json"; echo "not run" > "$WORK/measure-$core.txt"; continue; fi
  say "$core: probe (import torch, 2-thread matmul, cpu_safety, one cnn training step at batch 32)"
  PROBE[$core]=$("$WORK/pi_exec" $core python3 /tmp/probe.py 2>"$WORK/probe-$core.err" | tail -1 || true)
  [ -n "${PROBE[$core]}" ] || PROBE[$core]="{\"error\": \"$(tail -c 300 "$WORK/probe-$core.err" | tr '\n"' ' \047')\"}"
  echo "${PROBE[$core]}" > "$WORK/probe-$core.json"
  say "$core: ${PROBE[$core]}"
  if [ "$MEASURE_CMD" = 0 ]; then echo "not run" > "$WORK/measure-$core.txt"; continue; fi
  say "$core: python -m fl_app.measure --seconds 2"
  MEASURE[$core]=$("$WORK/pi_exec" $core python3 -m fl_app.measure --name pi-emulated --seconds 2 2>"$WORK/measure-$core.err" \
                    | sed -n 's/^gflops = \(.*\)$/\1/p' || true)
  [ -n "${MEASURE[$core]}" ] || MEASURE[$core]="failed: $(grep -v '^$' "$WORK/measure-$core.err" | tail -1 | cut -c1-120)"
  grep -h "LSE atomics" "$WORK/measure-$core.err" | head -1 || true
  say "$core: measure gflops ${MEASURE[$core]}"
  echo "${MEASURE[$core]}" > "$WORK/measure-$core.txt"
done

# 6. the federation
FED_JSON=$WORK/federation.json
if [ "$FEDERATION" = 1 ]; then
  say "federation: native SuperLink, emulated SuperNodes a53 (Pi 3B+), a72 (Pi 4), a76 (Pi 5), 1 round"
  python3 "$REPO/scripts/emulate_pi.py" --exec "$WORK/pi_exec" --json "$FED_JSON" || true
else
  echo '{}' > "$FED_JSON"
fi

# the table
python3 - "$OUT" "$TORCH" "$TORCH_MB" "$WHEEL_MB" "$WORK" "$(( $(date +%s) - T0 ))" "$(qemu-aarch64-static --version | head -1)" <<'EOF'
import json, sys
from pathlib import Path
out, torch_v, torch_mb, wheel_mb, work, wall, qemu = sys.argv[1:]
work = Path(work)
cores = {"cortex-a53": "Pi 3B+", "cortex-a72": "Pi 4", "cortex-a76": "Pi 5"}
probes = {c: json.loads((work / f"probe-{c}.json").read_text()) for c in cores}
measure = {c: (work / f"measure-{c}.txt").read_text().strip() for c in cores}
fed = json.loads((work / "federation.json").read_text())
lines = [f"Raspberry Pi cores under QEMU user emulation ({qemu}), arm64 Debian bookworm, Python 3.11,",
         f"torch=={torch_v} (aarch64 wheel {wheel_mb} MB, {torch_mb} MB installed), flwr 1.41.0; 2-core x86_64 host.",
         "Emulated times are NOT board times (QEMU is several times slower than the real core); they show what runs.",
         "import: `import torch` seconds. 2-thread matmul: a 256x256 matmul on 2 threads without the app's",
         "decision. cpu_safety: fl_app.cpu_safety.apply() (one thread without LSE atomics). step: one SGD step",
         "of the app's cnn at batch 32 (after the decision). measure: `python -m fl_app.measure` GFLOPS.",
         "round: the emulated SuperNode's ClientApp trained in a completed 1-round run (scripts/emulate_pi.py).", "",
         f"{'core':<11} {'board':<7} {'import s':>8} {'2-thread matmul':>16} {'cpu_safety':>11} {'step s':>7} "
         f"{'measure GFLOPS':>15} {'round':>6}"]
for core, board in cores.items():
    p = probes[core]
    if "Illegal instruction" in str(p.get("error", "")):
        p = {"import": "SIGILL"}  # the process died importing torch
    rnd = fed.get("rounds", {}).get(core, "not run")
    lines.append(f"{core:<11} {board:<7} {str(p.get('import_s', p.get('import', p.get('error', '?')))):>8} "
                 f"{p.get('matmul_2_threads', '-'):>16} {p.get('cpu_safety', '-'):>11} {str(p.get('train_step_s', '-')):>7} "
                 f"{measure[core]:>15} {rnd:>6}")
if fed:
    lines += ["", f"federation: status {fed.get('status')}, run wall {fed.get('run_wall_s')} s, "
                  f"round seconds {fed.get('round_seconds')}, startup {fed.get('startup_s')} s, nodes {fed.get('nodes')}"]
    lines += [f"  error: {e}" for e in fed.get("errors", [])]
    if fed.get("cpu_safety_logged"):
        lines.append(f"  cpu_safety logged its one-thread decision on: {', '.join(fed['cpu_safety_logged'])}")
lines.append(f"whole script: {wall} s")
text = "\n".join(lines) + "\n"
Path(out).write_text(text)
print(text)
EOF
