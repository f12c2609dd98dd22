set -e
umask 022
p=@store@/@base@
mkdir -p @store@ @registry@
if [ ! -e "$p" ]; then
  t=@store@/.flotilla-partial-bootstrap-@base@
  cat > "$t"
  chmod 0555 "$t"
  mv -f "$t" "$p"
  printf '%s\n' @registration@ > @registry@/.@base@.tmp
  mv -f @registry@/.@base@.tmp @registry@/@base@
fi
