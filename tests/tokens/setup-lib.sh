# shellcheck shell=bash
# setup-lib.sh: sourced by the setup-NAME.sh scripts that start daemons
# (tests/tokens/README): they list what they started in DIR/pids, one
# "PID what" line each, and stop it by PID.

# stop_pid PID: TERM, then KILL after 5 s.
stop_pid() {
	local _i
	kill -0 "$1" 2>/dev/null || return 0
	kill -TERM "$1" 2>/dev/null || return 0
	for _i in $(seq 50); do
		kill -0 "$1" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "$1" 2>/dev/null || :
}

# stop_recorded DIR NAME: stops every process of DIR/pids, last started
# first, that is still ours (its command line or environment names DIR: a
# PID may have been reused), says so for one that is not (as NAME), and
# removes the list.
stop_recorded() {
	local dir=$1 name=$2 pid what
	[ -f "$dir/pids" ] || return 0
	tac "$dir/pids" | while read -r pid what; do
		if grep -qaF -- "$dir" "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null; then
			stop_pid "$pid"
		else
			[ ! -e "/proc/$pid" ] || echo "$name: pid $pid ($what) is not ours any more; left alone" >&2
		fi
	done
	rm -f "$dir/pids"
}
