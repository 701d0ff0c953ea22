# The equivalent of %systemd_postun_with_restart: restart on upgrade; state stays on erase.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    systemctl try-restart clawnode.service >/dev/null 2>&1 || :
fi
