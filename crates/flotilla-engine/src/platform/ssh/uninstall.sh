set -e
if [ -f @unit_path@ ]; then
  systemctl disable --now --quiet @unit_name@ 2>/dev/null || true
  rm -f @unit_path@
  systemctl daemon-reload 2>/dev/null || true
fi
@agent@ stop >/dev/null
@agent@ uninstall --yes
