#!/usr/bin/env bash
# Installs swapfs system-wide: its Debian packages, a virtual environment in
# /opt/swapfs, the commands in /usr/local/bin, the systemd units, an example
# configuration in /etc/swapfs and the documentation. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh
python3 -m venv /opt/swapfs
/opt/swapfs/bin/pip install -q --upgrade pip
/opt/swapfs/bin/pip install -q .
ln -sf /opt/swapfs/bin/swapfs /usr/local/bin/swapfs
ln -sf /opt/swapfs/bin/swapfs-mountd /usr/local/bin/swapfs-mountd

install -m 0644 systemd/swapfs@.service systemd/swapfs-swap@.service systemd/swapfs.target \
    /etc/systemd/system/
install -d -m 0755 /etc/swapfs
install -m 0644 systemd/example.toml /etc/swapfs/example.toml.sample
# New states are encrypted at rest: the host's master key, made once and
# never overwritten (docs/encryption.md).
if [ ! -e /etc/swapfs/master.key ]; then
    /usr/local/bin/swapfs keygen /etc/swapfs/master.key
fi
install -d -m 0755 /usr/local/share/doc/swapfs
install -m 0644 README.md docs/*.md /usr/local/share/doc/swapfs/
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
cat <<'DONE'
swapfs installed; new states are encrypted with /etc/swapfs/master.key (keep a copy
of it somewhere safe: without it an encrypted state cannot be read). To run a mount
under systemd:
  cp /etc/swapfs/example.toml.sample /etc/swapfs/main.toml   # then edit it
  systemctl enable --now swapfs@main.service
  systemctl enable --now "swapfs-swap@$(systemd-escape --path /mnt/swapfs/web/vm1.swap).service"
DONE
