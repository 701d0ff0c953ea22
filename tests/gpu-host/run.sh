#!/usr/bin/env bash
# The packaged unit on a real GPU, under a real systemd, on a host that runs none (a GPU cloud
# VM or container): boots the Debian root filesystem from rootfs.sh as a container (own PID,
# mount, network and cgroup namespaces, systemd as its PID 1), with the host's /dev and its
# libnvidia-ml, and runs guest.sh there. Results land in <out>/guest.log; exit status = failures.
# Usage (root): tests/gpu-host/run.sh <rootfs.tar.xz> <clawnode.deb> <out-dir>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [[ ${1:-} == --stage2 ]]; then
  # PID 1 of the new PID namespace: a cgroup of its own, then a cgroup namespace rooted there,
  # so systemd sees a whole hierarchy it may delegate from.
  cg=/sys/fs/cgroup/clawnode-gpu-host
  mkdir -p "$cg"
  echo 0 > "$cg/cgroup.procs"
  exec unshare --cgroup -- "$0" --stage3 "$2"
fi
if [[ ${1:-} == --stage3 ]]; then
  r=$2
  mount --rbind "$r" "$r"
  mount --rbind /dev "$r/dev"
  cd "$r"
  mkdir -p oldroot
  pivot_root . oldroot
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
  umount -l /oldroot
  exec env container=clawnode-gpu-host /lib/systemd/systemd
fi

tarball=${1:?rootfs.tar.xz} deb=${2:?clawnode .deb} out=${3:?out dir}
mkdir -p "$out"
r=$(mktemp -d /tmp/gpu-host.XXXXXX)
tar -C "$r" -xJf "$tarball"
mkdir -p "$r/payload" "$r/out"
cp "$deb" "$here/guest.sh" "$r/payload/"
# The driver's NVML comes from the host, as on any machine with the driver installed.
lib=$(ldconfig -p | awk '/libnvidia-ml\.so\.1 /{print $NF; exit}')
[[ -n $lib ]] || { echo "no libnvidia-ml.so.1 on this host" >&2; exit 1; }
cp -L "$lib" "$r/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
# NVML reads the CUDA driver version through libcuda, which every driver install has too.
cuda=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
[[ -z $cuda ]] || cp -L "$cuda" "$r/usr/lib/x86_64-linux-gnu/libcuda.so.1"
echo gpu-host > "$r/etc/hostname"
cat > "$r/etc/systemd/system/gpu-check.service" <<'UNIT'
[Unit]
After=multi-user.target
[Service]
Type=exec
ExecStart=/bin/bash -c 'bash /payload/guest.sh >/out/guest.log 2>&1; echo "EXIT=$?" >>/out/guest.log; systemctl poweroff --no-block'
[Install]
WantedBy=multi-user.target
UNIT
chroot "$r" systemctl enable gpu-check.service >/dev/null 2>&1
for unit in console-getty.service getty@tty1.service systemd-logind.service apt-daily.timer \
            apt-daily-upgrade.timer dpkg-db-backup.timer systemd-networkd.service; do
  chroot "$r" systemctl mask "$unit" >/dev/null 2>&1 || true
done

mount --bind "$out" "$r/out" 2>/dev/null || true
set +e
timeout 480 unshare --fork --pid --mount --uts --ipc --net --propagation private \
  "$0" --stage2 "$r" >"$out/systemd.log" 2>&1
rc=$?
set -e
echo "container exited: $rc"
umount "$r/out" 2>/dev/null || true
# Only when nothing is mounted there any more: a leftover bind would take <out> with it.
mountpoint -q "$r/out" || rm -rf "$r"
rmdir /sys/fs/cgroup/clawnode-gpu-host 2>/dev/null || true
cat "$out/guest.log" 2>/dev/null || { echo "no guest.log"; tail -50 "$out/systemd.log"; exit 1; }
fails=$(sed -n 's/^EXIT=//p' "$out/guest.log")
exit "${fails:-1}"
