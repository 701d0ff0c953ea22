# The daemon's system user and group (the equivalent of %sysusers_create_compat).
systemd-sysusers clawnode.conf >/dev/null 2>&1 || :
mkdir -p /etc/clawbernetes/peers.d
# The daemon (user clawbernetes) reads its config and peer files but cannot change them. Only
# root-owned paths still in root's group are re-grouped: an operator's own choice stays.
for path in /etc/clawbernetes /etc/clawbernetes/peers.d /etc/clawbernetes/clawbernetes.toml; do
    if [ -e "$path" ] && [ "$(stat -c %U:%G "$path")" = root:root ]; then
        chgrp clawbernetes "$path" || :
        if [ -d "$path" ]; then chmod 0750 "$path"; else chmod 0640 "$path"; fi
    fi
done
# The equivalent of %systemd_post: reload units, apply the preset on first install.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset clawnode.service >/dev/null 2>&1 || :
fi
