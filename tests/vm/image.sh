#!/usr/bin/env bash
# Build the guest: a bookworm root filesystem with systemd and the cloud kernel, a runner unit
# that executes the payload's run.sh after boot and powers off, and an ext4 image of it.
# Usage: tests/vm/image.sh <out-dir> <comma-separated packages>
set -euo pipefail
out=${1:?out dir}
pkgs=${2:?packages}
root=$out/rootfs

# The machine's own mirrors, not a hard-coded host: deb822 .sources first, then one-line lists.
sources() { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; }
lists() { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; }
mirror=$(sources | sed -n 's|^URIs: *\(.*/debian/\?\)$|\1|p' | head -1)
security=$(sources | sed -n 's|^URIs: *\(.*/debian-security/\?\)$|\1|p' | head -1)
[[ -n $mirror ]] || mirror=$(lists | sed -n 's|^deb \(http[^ ]*/debian/\?\) .*|\1|p' | head -1)
[[ -n $security ]] || security=$(lists | sed -n 's|^deb \(http[^ ]*/debian-security/\?\) .*|\1|p' | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
security=${security:-http://deb.debian.org/debian-security}
echo "mirrors: $mirror $security"

mmdebstrap --variant=minbase --include="$pkgs" bookworm "$root" \
  "deb $mirror bookworm main" \
  "deb $security bookworm-security main" \
  "deb $mirror bookworm-updates main"

echo e2e > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 e2e\n' > "$root/etc/hosts"
echo 'LABEL=e2eroot / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"
[[ -s $root/etc/machine-id ]] || chroot "$root" systemd-machine-id-setup
rm -f "$root/etc/resolv.conf"

cat > "$root/usr/local/sbin/e2e-runner" <<'RUNNER'
#!/bin/bash
export SYSTEMD_COLORS=0 SYSTEMD_PAGER= TERM=dumb WG_COLOR_MODE=never
systemctl is-system-running --wait >/dev/null 2>&1
mkdir -p /mnt/payload
mount -o ro LABEL=E2EPAYLOAD /mnt/payload
bash /mnt/payload/run.sh
echo "E2E-EXIT-CODE=$?"
sync
systemctl poweroff --no-block
RUNNER
chmod 755 "$root/usr/local/sbin/e2e-runner"
cat > "$root/etc/systemd/system/e2e-runner.service" <<'UNIT'
[Unit]
After=multi-user.target
ConditionKernelCommandLine=e2e.run=1
[Service]
Type=exec
ExecStart=/usr/local/sbin/e2e-runner
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS1
TTYReset=no
TTYVHangup=no
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable e2e-runner.service >/dev/null 2>&1
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
            e2scrub_reap.service fstrim.timer getty@tty1.service systemd-pstore.service; do
  chroot "$root" systemctl mask "$unit" >/dev/null 2>&1 || true
done
cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
chroot "$root" apt-get clean
mkfs.ext4 -q -L e2eroot -d "$root" -E root_owner=0:0 "$out/root.img" 1G
rm -rf "$root"
