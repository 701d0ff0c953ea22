# The equivalent of %systemd_postun_with_restart: restart on upgrade. rpm has no purge, so an
# erase is dpkg's remove: /var/lib/clawbernetes (WireGuard key, owned-services record,
# certificates) stays, and nothing clawnode did not write is ever deleted. The user and group
# stay too, as Fedora's packaging guidelines ask, so that no later user inherits its files.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    systemctl try-restart clawnode.service >/dev/null 2>&1 || :
fi
