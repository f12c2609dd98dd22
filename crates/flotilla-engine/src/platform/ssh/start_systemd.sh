set -e
mkdir -p @bin_dir@
ln -sfn @agent@ @link@
unit=@unit_text@
if [ ! -f @unit_path@ ] || [ "$(cat @unit_path@)" != "$unit" ]; then
  printf '%s\n' "$unit" > @unit_path@.flotilla-tmp
  mv -f @unit_path@.flotilla-tmp @unit_path@
  systemctl daemon-reload
fi
systemctl enable --quiet @unit_name@
systemctl @verb@ @unit_name@
i=0
until @link@ status-line | grep -q '^running'; do
  i=$((i+1)); [ $i -lt 150 ] || { echo "the agent did not answer within 15 s; see journalctl -u @unit_name@" >&2; exit 1; }
  sleep 0.1
done
