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
  mkdir "$2"
  echo 0 > "$2/cgroup.procs"
  exec unshare --cgroup -- "$0" --stage3 "$3" "$4"
fi
if [[ ${1:-} == --stage3 ]]; then
  r=$2 out=$3
  # Every mount here lives in the container's private mount namespace and dies with it.
  mount --bind "$r" "$r"
  mount --rbind /dev "$r/dev"
  mount --bind "$out" "$r/out"
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
out=$(realpath "$out")
rm -f "$out"/guest.log "$out"/systemd.log "$out"/status.json "$out"/metrics.txt
r=$(mktemp -d /tmp/gpu-host.XXXXXX)
cg=/sys/fs/cgroup/clawnode-gpu-host.$$
cleanup() {
  # systemd leaves child cgroups behind; cgroup v2 removes only empty leaves.
  if [[ -d $cg ]]; then find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  rm -rf --one-file-system "$r"
}
trap cleanup EXIT
tar -C "$r" -xJf "$tarball"
mkdir -p "$r/payload" "$r/out"
cp "$deb" "$here/guest.sh" "$r/payload/"
# The driver's NVML comes from the host, as on any machine with the driver installed; awk reads
# to the end so that ldconfig never dies of SIGPIPE under pipefail.
lib_path() { ldconfig -p | awk -v name="$1" '$1 == name && /x86-64/ && !n++ {print $NF}'; }
lib=$(lib_path libnvidia-ml.so.1)
[[ -n $lib ]] || { echo "no libnvidia-ml.so.1 on this host" >&2; exit 1; }
cp -L "$lib" "$r/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
# NVML reads the CUDA driver version through libcuda, which every driver install has too.
cuda=$(lib_path libcuda.so.1)
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
# The host's /dev is shared: nothing in the container may re-own or re-mode its nodes.
for unit in console-getty.service getty@tty1.service systemd-logind.service apt-daily.timer \
            apt-daily-upgrade.timer dpkg-db-backup.timer systemd-networkd.service \
            systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup-dev-early.service \
            systemd-udevd.service systemd-udev-trigger.service; do
  chroot "$r" systemctl mask "$unit" >/dev/null 2>&1 || true
done

# --kill-child: when timeout stops unshare, the container's PID 1 (and so all of it) goes too.
set +e
timeout 480 unshare --fork --kill-child=SIGKILL --pid --mount --uts --ipc --net \
  --propagation private "$0" --stage2 "$cg" "$r" "$out" >"$out/systemd.log" 2>&1
rc=$?
set -e
# systemd powering off a container's PID namespace ends it with SIGINT (130).
echo "container exited: $rc"
if [[ ! -s $out/guest.log ]]; then
  echo "FAIL: the guest wrote no results; container output:"
  tail -50 "$out/systemd.log"
  exit 1
fi
cat "$out/guest.log"
fails=$(sed -n 's/^EXIT=//p' "$out/guest.log")
[[ -n $fails ]] || { echo "FAIL: the guest did not finish (timeout?)"; exit 1; }
exit "$fails"
