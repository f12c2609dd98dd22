set -e
mkdir -p @bin_dir@
if [ @restart@ = yes ]; then @link@ stop >/dev/null; fi
ln -sfn @agent@ @link@
@link@ init --detach >/dev/null
