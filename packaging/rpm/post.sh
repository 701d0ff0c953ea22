# The equivalent of %systemd_post: reload units, apply the preset on first install.
mkdir -p /etc/clawbernetes/peers.d
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset clawnode.service >/dev/null 2>&1 || :
fi
