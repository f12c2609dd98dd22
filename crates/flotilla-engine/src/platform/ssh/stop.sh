if [ -d /run/systemd/system ] && systemctl is-active --quiet @unit_name@; then systemctl stop @unit_name@; else @link@ stop >/dev/null; fi
