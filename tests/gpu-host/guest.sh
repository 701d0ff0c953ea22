#!/bin/bash
# Runs as a unit inside the container that run.sh boots on a GPU host: installs the .deb and
# proves the hardened unit lets NVML open the GPU, and that the device filter is really on
# (the same unit with only the old "nvidia-frontend" class must lose the GPU).
# Every check prints PASS or FAIL; the exit status is the number of failures.
set -u
export SYSTEMD_COLORS=0 SYSTEMD_PAGER= TERM=dumb
fails=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; fails=$((fails + 1)); }
status_text() { systemctl show -p StatusText --value clawnode; }
# The user a process runs as (ps pads the column to the width asked for).
user_of() { ps -o user:32= -p "$1" | tr -d ' '; }
wait_for() { local i; for i in $(seq 1 "$1"); do if eval "$2"; then return 0; fi; sleep 1; done; return 1; }
metrics() {
  exec 3<>/dev/tcp/127.0.0.1/9401 || return 1
  printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
dropin=/etc/systemd/system/clawnode.service.d
restart_with() {
  rm -rf "$dropin"
  if [[ -n $1 ]]; then mkdir -p "$dropin" && printf '[Service]\nDeviceAllow=\n%b' "$1" > "$dropin/devices.conf"; fi
  systemctl daemon-reload
  systemctl restart --no-block clawnode
}

echo "--- host"
uname -r
grep -i nvidia /proc/devices
ls -l /dev/nvidiactl /dev/nvidia[0-9]* /dev/nvidia-uvm /dev/nvidia-caps 2>&1
systemctl is-system-running --wait

echo "--- install"
dpkg -i /payload/clawnode_*.deb >/dev/null && pass dpkg_install || fail dpkg_install
ip link add wgprobe type wireguard 2>/dev/null && { echo "kernel wireguard: yes"; ip link del wgprobe; } || echo "kernel wireguard: no (wireguard-go fallback)"
cat > /etc/clawbernetes/clawbernetes.toml <<CONF
[node]
name = "gpu-host"
[api]
metrics_listen = "127.0.0.1:9401"
[network.wireguard]
mesh_cidr = "198.51.100.0/24"
address = "198.51.100.1/24"
[gpu]
enabled = true
required = true
CONF

echo "--- shipped unit"
restart_with ""
systemctl show -p DeviceAllow -p DevicePolicy clawnode
if wait_for 60 '[ "$(systemctl is-active clawnode)" = active ]'; then pass ready_with_required_gpu; else fail ready_with_required_gpu "$(systemctl is-active clawnode)"; fi
# NVML as the unit's own user: the driver's nodes are normally 0666 (NVreg_DeviceFileMode).
user=$(user_of "$(systemctl show -p MainPID --value clawnode)")
[[ $user == clawbernetes ]] && pass nvml_as_the_clawbernetes_user || fail nvml_as_the_clawbernetes_user "$user"
st=$(status_text); echo "StatusText: $st"
[[ $st =~ ^ready:.*[^0-9]([1-9][0-9]*)\ GPUs?([^a-z]|$) ]] && pass status_counts_the_gpu || fail status_counts_the_gpu "$st"
clawnode status --json > /out/status.json 2>&1
grep -q '"name": *"NVIDIA' /out/status.json && pass status_json_has_gpu_model || fail status_json_has_gpu_model
metrics > /out/metrics.txt 2>&1
grep -q '^DCGM_FI_DEV_GPU_TEMP{' /out/metrics.txt && pass metrics_temperature || fail metrics_temperature
grep -q '^DCGM_FI_DEV_FB_USED{' /out/metrics.txt && pass metrics_memory_used || fail metrics_memory_used
grep -E '^(DCGM_FI_DEV_(GPU_TEMP|POWER_USAGE|FB_FREE|GPU_UTIL)|clawnode_gpus|clawnode_gpu_lost)' /out/metrics.txt
grep -q '"cuda_driver_version": *"[0-9]' /out/status.json && pass cuda_version_under_the_sandbox || fail cuda_version_under_the_sandbox
journalctl -u clawnode -o cat --no-pager | grep -iE 'gpu|nvml|xid' | tail -5
xid=$(journalctl -u clawnode -o json --no-pager | grep '"MESSAGE":"watching for XID errors"' | tail -1)
xid_gpus=$(echo "$xid" | sed -n 's/.*"GPUS":"\([0-9]*\)".*/\1/p')
xid_of=$(echo "$xid" | sed -n 's/.*"OF":"\([0-9]*\)".*/\1/p')
[[ -n $xid_gpus && $xid_gpus -gt 0 && $xid_gpus == "$xid_of" ]] && pass xid_events_registered_for_every_gpu || fail xid_events_registered_for_every_gpu "${xid_gpus:-?} of ${xid_of:-?}"
# One /metrics scrape on the real GPU against a 404 on the same listener (same run, same path).
scrape() { local t0=$EPOCHREALTIME; exec 3<>/dev/tcp/127.0.0.1/9401; printf 'GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' "$1" >&3; cat <&3 >/dev/null; exec 3<&-; echo "$t0 $EPOCHREALTIME" | awk '{printf "%.6f\n", $2 - $1}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m=$(for i in $(seq 1 41); do scrape /metrics; done | median)
r=$(for i in $(seq 1 41); do scrape /nothing; done | median)
echo "INFO /metrics scrape median ${m}s, 404 reference ${r}s, ratio $(echo "$m $r" | awk '{printf "%.1f", $1 / $2}')"
systemd-analyze security clawnode.service 2>/dev/null | tail -1

echo "--- old class name only (nvidia-frontend): the filter must keep NVML out"
restart_with 'DeviceAllow=/dev/net/tun rw\nDeviceAllow=char-nvidia-frontend rw\nDeviceAllow=char-nvidia-caps r\n'
sleep 15
st=$(status_text); echo "StatusText: $st ($(systemctl is-active clawnode))"
[[ $(systemctl is-active clawnode) != active && $st == *GPU* ]] && pass old_class_name_loses_the_gpu || fail old_class_name_loses_the_gpu "$st"
reason=$(clawnode status --json | sed -n 's/.*"unavailable_reason": *"\([a-z_]*\)".*/\1/p')
[[ $reason == device_access_denied ]] && pass denial_is_named || fail denial_is_named "$reason"
clawnode status --json | grep -m1 '"detail"\|cannot open' || true

echo "--- back to the shipped unit, then stop"
restart_with ""
wait_for 60 '[ "$(systemctl is-active clawnode)" = active ]' && pass ready_again || fail ready_again
ip link show claw0 >/dev/null 2>&1 && pass interface_up_before_stop || fail interface_up_before_stop
systemctl stop clawnode
wait_for 10 '! ip link show claw0 >/dev/null 2>&1' && pass stop_removes_interface || fail stop_removes_interface
echo "failures: $fails"
exit "$fails"
