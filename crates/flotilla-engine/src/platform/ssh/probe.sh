agent=@agent@
echo "uid=$(id -u)"
echo "arch=$(uname -m)"
if [ "$(id -u)" = 0 ]; then s=; elif err=$(sudo -n true 2>&1 </dev/null); then s="sudo -n --"; echo sudo=ok; else echo "sudo=$(printf %s "$err" | head -n 1)"; exit 0; fi
if [ -d /run/systemd/system ]; then echo systemd=yes; fi
if [ -d /nix/var/nix/db ]; then echo nix=yes; fi
# By its absolute path: a multi-user install's is on neither sudo's secure_path nor this PATH.
places=@nix_store_places@
for d in $places; do if [ -x "$d/nix-store" ]; then echo "nix-store=$d/nix-store"; break; fi; done
if [ -x "$agent" ]; then echo agent=present; $s "$agent" status-line 2>/dev/null </dev/null | sed 's/^/agent-state=/'; fi
