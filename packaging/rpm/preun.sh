# The equivalent of %systemd_preun: stop and disable on erase, not on upgrade.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now clawnode.service >/dev/null 2>&1 || :
fi
