#!/bin/bash
# t_config: the layered configuration of p11agentd (p11agentd.conf(5)).
# Every key with its value and source in --print-config; the user's file
# over the administrator's, flags over both; locks; the administrator's
# module-allow list against a user's module line, --module and the p11-kit
# registry (a refused module is never dlopen()ed: LD_DEBUG shows what the
# agent's processes load); module-skip; [module] sections (NSS softokn's
# init-args, session-pool); each kind of bad file: FILE:LINE and no start;
# `p11agent status` naming a failed module and why; the private socket
# directory without XDG_RUNTIME_DIR; the p11-kit registry read without
# loading (a user's registry, overrides, enable-in/disable-in, user-config).
set -eu
# shellcheck source=tests/integration/lib.sh
. "$(dirname "$0")/lib.sh"

SOFTOKN=/usr/lib/x86_64-linux-gnu/libsoftokn3.so
TRUST=/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-trust.so
OPENSC_MODULE_FILE=/usr/share/p11-kit/modules/opensc-pkcs11.module
require_cmd certutil setpriv timeout "$PYTHON3"
require_agent_binaries
require_file "$SOFTHSM2_MODULE" "$SOFTOKN" "$TRUST" "$OPENSC_MODULE_FILE"
make_token

TAB=$(printf '\t')
A=$T/etc/p11agent/p11agentd.conf       # the administrator's file (P11AGENT_SYSCONFDIR, lib.sh)
U=$T/user.conf                         # given with --config
mkdir -p "$T/etc/p11agent" "$T/config/p11agent"
SOFTHSM_REAL=$(readlink -f "$SOFTHSM2_MODULE")
SOFTHSM_DIR=$(dirname "$SOFTHSM_REAL")

admin_file() { printf '%s\n' "$@" >"$A"; }
user_file() { printf '%s\n' "$@" >"$U"; }
no_admin_file() { rm -f "$A"; }

# pc ARGS...: --print-config with the user's file $U (and ARGS).
pc() {
	run "$P11AGENTD" --config "$U" --print-config "$@"
}

# pc_line DESC KEY VALUE SOURCE: the last --print-config output has the
# line "KEY VALUE<TAB># SOURCE" (SOURCE may be followed by "; locked at ...").
pc_line() {
	local want="$2 $3$TAB# $4" line found=no
	while IFS= read -r line; do
		case $line in
		"$want" | "$want; locked at "*) found=yes ;;
		esac
	done <"$T/stdout"
	if [ "$found" = yes ]; then
		ok "$1"
	else
		not_ok "$1"
		diag "print-config lacks: $2 $3<TAB># $4"
		diag_last
	fi
}

# pc_module_line DESC MODULE KEY VALUE SOURCE: as pc_line, within the
# "[module MODULE]" part of the output (up to the next section).
pc_module_line() {
	awk -v m="[module $2]" '$0 == m { on = 1; next } /^\[/ { on = 0 } on' "$T/stdout" >"$T/section"
	local want="$3 $4$TAB# $5" line found=no
	while IFS= read -r line; do
		case $line in
		"$want" | "$want; locked at "*) found=yes ;;
		esac
	done <"$T/section"
	if [ "$found" = yes ]; then
		ok "$1"
	else
		not_ok "$1"
		diag "[module $2] lacks: $3 $4<TAB># $5"
		diag_last
	fi
}

# refused DESC WANT: the agent, started for real with the files and flags
# given after WANT, exits 1 before listening and says WANT on stderr.
refused() {
	local desc=$1 want=$2
	shift 2
	rm -f "$T/bad.sock"
	run timeout 10 "$P11AGENTD" --foreground --socket "$T/bad.sock" "$@"
	rc_is 1 "$desc: the agent does not start"
	stderr_has "$want" "$desc: says '$want'"
	check "$desc: no socket was made" test ! -e "$T/bad.sock"
}

# bad_user_file DESC WANT LINE...: $U holds the LINEs; refused with WANT.
bad_user_file() {
	local desc=$1 want=$2
	shift 2
	user_file "$@"
	refused "$desc" "$want" --config "$U"
}

# loaded_by_agent FILE_NAME: some process of the agent loaded a file of
# that name: the dynamic linker's LD_DEBUG=files lines in the agent's log.
# (Not LD_DEBUG_OUTPUT: the linker's descriptor for that file does not
# survive a helper's descriptor clean-up, and its lines would land on the
# helper's control socket.)
# A wrapper from outside (valgrind, tests/run-valgrind.sh) stays in place.
OUTER_WRAPPER=${P11AGENTD_WRAPPER:-}
LD_WRAPPER="env LD_DEBUG=files $OUTER_WRAPPER"
loaded_by_agent() {
	grep -F "file=" "$AGENT_LOG" | grep -qF "/$1"
}

stop_and_reset() {
	stop_agent
	AGENT_ARGS=()
	AGENT_REGISTRY=no
	P11AGENTD_WRAPPER=$OUTER_WRAPPER
	: >"$AGENT_LOG"
}

# ---------------------------------------------------------------- defaults and sources
no_admin_file
user_file "# nothing"
pc --socket "$T/x.sock"
rc_is 0 "--print-config exits 0"
stdout_has "# administrator's file: $A (not present)" "--print-config names the administrator's file (absent)"
stdout_has "# user's file: $U (read)" "--print-config names the user's file"
pc_line "default sign-timeout" sign-timeout 30 default
pc_line "default session-pool" session-pool 32 default
pc_line "default max-connections" max-connections 1024 default
pc_line "socket from --socket" socket "$T/x.sock" --socket
stdout_has "# modules: those registered with p11-kit" "no module line: the p11-kit registry"

run env P11AGENT_SOCK="$T/env.sock" "$P11AGENTD" --config "$U" --print-config
pc_line "socket from P11AGENT_SOCK" socket "$T/env.sock" 'default ($P11AGENT_SOCK)'

# Without --config the user's file is $XDG_CONFIG_HOME/p11agent/p11agentd.conf.
printf 'sign-timeout 7\n' >"$T/config/p11agent/p11agentd.conf"
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --print-config
pc_line "the user's file under XDG_CONFIG_HOME" sign-timeout 7 "$T/config/p11agent/p11agentd.conf:1"
run env XDG_CONFIG_HOME="$T/config" "$P11AGENTD" --config "$U" --print-config
pc_line "--config replaces the user's file" sign-timeout 30 default

# ---------------------------------------------------------------- every key, from the user's file
user_file \
	"# every setting" \
	"socket $T/u.sock" \
	"module $SOFTHSM2_MODULE   # trailing comment" \
	"module-init-args flags=softhsm" \
	"module $SOFTOKN" \
	"module-skip $SOFTOKN" \
	"session-pool 5" \
	"sign-timeout 20" \
	"max-connections 300" \
	"max-channels-per-connection 16" \
	"max-channels-per-process 48" \
	"debug yes" \
	"" \
	"[module libsofthsm2.so]" \
	"session-pool 3"
pc
rc_is 0 "a file with every user setting is accepted"
pc_line "socket" socket "$T/u.sock" "$U:2"
pc_line "module" module "$SOFTHSM2_MODULE" "$U:3"
pc_module_line "module-init-args" libsofthsm2.so init-args flags=softhsm "$U:4"
pc_line "module-skip" module-skip "$SOFTOKN" "$U:6"
pc_line "session-pool" session-pool 5 "$U:7"
pc_line "sign-timeout" sign-timeout 20 "$U:8"
pc_line "max-connections" max-connections 300 "$U:9"
pc_line "max-channels-per-connection" max-channels-per-connection 16 "$U:10"
pc_line "max-channels-per-process" max-channels-per-process 48 "$U:11"
pc_line "debug" debug yes "$U:12"
pc_module_line "[module] session-pool" libsofthsm2.so session-pool 3 "$U:15"
stdout_has "# not used: libsoftokn3.so ($SOFTOKN, $U:5): skipped by module-skip $SOFTOKN ($U:6)" \
	"a skipped module is listed with the line that skipped it"
if grep -qF "# loaded as $SOFTHSM_REAL" "$T/stdout" || [ "$SOFTHSM_REAL" = "$SOFTHSM2_MODULE" ]; then
	ok "the real path the helper will load is shown"
else
	not_ok "the real path the helper will load is shown"
	diag_last
fi

# ---------------------------------------------------------------- layers
admin_file "sign-timeout 40" "max-connections 500" "debug yes"
user_file "sign-timeout 25"
pc --socket "$T/x.sock"
pc_line "the user's value over the administrator's" sign-timeout 25 "$U:1"
pc_line "the administrator's value where the user sets none" max-connections 500 "$A:2"
stdout_has "# administrator's file: $A (read)" "--print-config says the administrator's file was read"
# A later layer wins, global setting or section alike.
admin_file "[module libsofthsm2.so]" "session-pool 2" "init-args from=admin"
user_file "session-pool 5" "module $SOFTHSM2_MODULE" "module-init-args from=user"
pc --socket "$T/x.sock"
pc_module_line "the user's global session-pool over the administrator's [module] section" \
	libsofthsm2.so session-pool 5 "$U:1"
pc_module_line "the user's module-init-args over the administrator's [module] init-args" \
	libsofthsm2.so init-args from=user "$U:3"
admin_file "session-pool 5"
user_file "[module libsofthsm2.so]" "session-pool 3"
pc --socket "$T/x.sock" --module "$SOFTHSM2_MODULE"
pc_module_line "the user's [module] section over the administrator's global setting" \
	libsofthsm2.so session-pool 3 "$U:2"
admin_file "sign-timeout 40" "max-connections 500" "debug yes"
user_file "module $SOFTOKN" "debug no"
pc --module "$SOFTHSM2_MODULE" --debug --socket "$T/x.sock"
pc_line "--module replaces the file's modules" module "$SOFTHSM2_MODULE" --module
if grep -qF "module $SOFTOKN" "$T/stdout"; then
	not_ok "the file's module line is gone once --module is given"
	diag_last
else
	ok "the file's module line is gone once --module is given"
fi
pc_line "--debug over the file" debug yes --debug

# ---------------------------------------------------------------- locks
admin_file "sign-timeout 40" "lock sign-timeout max-connections" "lock module debug" "lock session-pool"
user_file "max-connections 10"
pc
rc_is 1 "a user's file that changes a locked setting is refused"
stderr_has "$U:1: 'max-connections' is locked by the administrator ($A:2)" \
	"the refusal names the user's line and the lock's line"
refused "a locked setting in the user's file" "$U:1: 'max-connections' is locked by the administrator ($A:2)" --config "$U"
user_file "# empty"
refused "--module with module locked" "--module: 'module' is locked by the administrator ($A:3)" \
	--config "$U" --module "$SOFTHSM2_MODULE"
run "$P11AGENTD" --config "$U" --debug --print-config
rc_is 1 "--debug with debug locked is refused"
stderr_has "--debug: 'debug' is locked by the administrator ($A:3)" "--debug: the refusal names the lock"
user_file "[module softhsm2]" "session-pool 2"
pc
stderr_has "$U:2: 'session-pool' is locked by the administrator ($A:4)" "a locked setting in a [module] section is refused"
user_file "[module softhsm2]" "init-args x=y"
pc
stderr_has "$U:2: 'init-args' is locked by the administrator ($A:3)" "init-args falls under a lock of 'module'"
user_file "module-init-args x=y"
pc
stderr_has "$U:1: 'module-init-args' is locked by the administrator ($A:3)" "module-init-args falls under a lock of 'module'"
user_file "# empty"
pc
rc_is 0 "locked settings the user leaves alone are fine"
pc_line "the administrator's locked value" sign-timeout 40 "$A:1"
stdout_has "sign-timeout 40$TAB# $A:1; locked at $A:2" "--print-config says where a value is locked"
stdout_has "lock sign-timeout$TAB# $A:2" "--print-config lists the locks"
admin_file "lock socket"
refused "--socket with socket locked" "--socket: 'socket' is locked by the administrator ($A:1)" --config "$U"
run env P11AGENT_SOCK="$T/env.sock" "$P11AGENTD" --config "$U" --print-config
rc_is 0 "P11AGENT_SOCK with socket locked is no error"
if grep -qF "$T/env.sock" "$T/stdout"; then
	not_ok "P11AGENT_SOCK does not override a locked socket"
	diag_last
else
	ok "P11AGENT_SOCK does not override a locked socket"
fi
admin_file "lock frobnicate"
refused "locking an unknown setting" "$A:1: cannot lock 'frobnicate'" --config "$U"

# ---------------------------------------------------------------- the administrator's module-allow list
admin_file "module-allow $SOFTHSM_DIR/*.so"
user_file "module $TRUST"
pc
rc_is 1 "a user's module outside module-allow is refused"
stderr_has "$U:1: module $TRUST: not allowed by the administrator" "the refusal names the user's line"
refused "a user's module outside module-allow" "$U:1: module $TRUST: not allowed by the administrator" --config "$U"
user_file "# empty"
refused "--module outside module-allow" "--module: module $TRUST: not allowed by the administrator" \
	--config "$U" --module "$TRUST"
# A link with an allowed name leads elsewhere: the real path decides.
mkdir -p "$T/links"
ln -sf "$TRUST" "$T/links/libsofthsm2.so"
refused "a link to a module outside module-allow" "not allowed by the administrator: its real path $(readlink -f "$TRUST")" \
	--config "$U" --module "$T/links/libsofthsm2.so"
user_file "module-allow $TRUST"
refused "module-allow in the user's file" "$U:1: module-allow belongs in the administrator's file ($A) only" --config "$U"
user_file "lock debug"
refused "lock in the user's file" "$U:1: lock belongs in the administrator's file ($A) only" --config "$U"

# Allowed: a link to the allowed file works too; the agent runs and serves.
ln -sf "$SOFTHSM2_MODULE" "$T/links/softhsm-link.so"
user_file "module $T/links/softhsm-link.so"
P11AGENTD_WRAPPER=$LD_WRAPPER
AGENT_REGISTRY=yes
AGENT_ARGS=(--config "$U")
if start_agent; then
	ok "a module inside module-allow (through a link) is used"
else
	not_ok "a module inside module-allow (through a link) is used"
fi
stop_and_reset

# The registry: every module outside the list is left out before anything loads it.
admin_file "module-allow $SOFTHSM_DIR/*.so" "module-allow $(dirname "$SOFTHSM2_MODULE")/*.so"
user_file "# registry"
P11AGENTD_WRAPPER=$LD_WRAPPER
AGENT_REGISTRY=yes
AGENT_ARGS=(--config "$U")
if start_agent; then
	ok "registry + module-allow: the allowed SoftHSM2 module serves the test token"
	run p11a status
	stdout_has "opensc-pkcs11" "status lists the registered module left out"
	stdout_has "not allowed by the administrator" "status says why it is not used"
else
	not_ok "registry + module-allow: the allowed SoftHSM2 module serves the test token"
fi
if loaded_by_agent libsofthsm2.so; then
	ok "LD_DEBUG: the agent loaded the allowed module (the check can see loads)"
else
	not_ok "LD_DEBUG: the agent loaded the allowed module (the check can see loads)"
fi
if loaded_by_agent opensc-pkcs11.so; then
	not_ok "LD_DEBUG: no agent process ever loaded the refused opensc-pkcs11.so"
	grep -F opensc "$AGENT_LOG" | head -n 5 | sed 's/^/#   /'
else
	ok "LD_DEBUG: no agent process ever loaded the refused opensc-pkcs11.so"
fi
stop_and_reset
no_admin_file

# ---------------------------------------------------------------- module-skip
user_file "module-skip opensc-pkcs11"
pc
stdout_has "# not used: opensc-pkcs11 (" "module-skip by p11-kit name leaves a registered module out"
stdout_has "skipped by module-skip opensc-pkcs11 ($U:1)" "--print-config names the module-skip line"
user_file "module-skip p11-kit-trust.so"
P11AGENTD_WRAPPER=$LD_WRAPPER
AGENT_ARGS=(--config "$U" --module "$TRUST")
if start_agent; then
	ok "module-skip: the agent runs with the modules not skipped"
	run p11a status
	stdout_has "p11-kit-trust.so     not used" "status lists the skipped module as not used"
else
	not_ok "module-skip: the agent runs with the modules not skipped"
fi
if loaded_by_agent p11-kit-trust.so; then
	not_ok "LD_DEBUG: the skipped module was never loaded"
else
	ok "LD_DEBUG: the skipped module was never loaded"
fi
stop_and_reset

# ---------------------------------------------------------------- [module] sections: init-args, session-pool
mkdir -p "$T/nssdb"
if ! certutil -N --empty-password -d "sql:$T/nssdb" >"$T/certutil.log" 2>&1; then
	diag_file "$T/certutil.log"
	bail_out "certutil made an NSS database"
fi
NSS_ARGS="configdir='sql:$T/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db' flags="
user_file "# no init-args"
AGENT_ARGS=(--config "$U" --module "$SOFTOKN")
if start_agent; then
	run p11a status
	stdout_has "modules:      1 up, 2 configured" "NSS softokn without init-args does not come up"
	stdout_has "libsoftokn3.so       failed" "status names the module that failed"
	stdout_has "C_Initialize: CKR_ARGUMENTS_BAD" "status says why it failed"
	stdout_has "recent warnings:" "status shows the agent's latest warnings"
else
	not_ok "agent with SoftHSM2 and NSS softokn starts"
fi
stop_and_reset

user_file "session-pool 4" "[module libsoftokn3.so]" "init-args $NSS_ARGS" "[module $SOFTHSM2_MODULE]" "session-pool 2"
pc --module "$SOFTHSM2_MODULE" --module "$SOFTOKN"
pc_module_line "[module NAME] init-args" libsoftokn3.so init-args "$NSS_ARGS" "$U:3"
pc_module_line "[module PATH] session-pool" libsofthsm2.so session-pool 2 "$U:5"
pc_module_line "global session-pool for a module without its own" libsoftokn3.so session-pool 4 "$U:1"
AGENT_ARGS=(--config "$U" --module "$SOFTOKN")
if start_agent; then
	run p11a status
	stdout_has "modules:      2 up, 2 configured" "NSS softokn with init-args from a [module] section comes up"
	stdout_has "token 'NSS" "NSS softokn's token is listed"
else
	not_ok "agent with SoftHSM2 and NSS softokn (init-args) starts"
fi
file_has "$AGENT_LOG" "up to 2 signing sessions" "session-pool 2 sizes SoftHSM2's signing pool"
stop_and_reset

# ---------------------------------------------------------------- bad files: FILE:LINE, no start
bad_user_file "a setting without a value" "$U:2: 'sign-timeout' needs a value" "# x" "sign-timeout"
bad_user_file "an unknown setting" "$U:1: unknown setting 'frobnicate'" "frobnicate 1"
bad_user_file "a value out of range" "$U:1: sign-timeout must be 1..3600 seconds, not '0'" "sign-timeout 0"
bad_user_file "debug neither yes nor no" "$U:1: debug must be yes or no, not 'maybe'" "debug maybe"
bad_user_file "a module name instead of a path" "$U:1: module path 'softhsm2' is not absolute" "module softhsm2"
bad_user_file "a relative socket" "$U:1: socket path must be absolute: agent.sock" "socket agent.sock"
bad_user_file "module-init-args before a module" "$U:1: module-init-args must follow a module line" "module-init-args x"
bad_user_file "an unknown section" "$U:1: unknown section [token x]" "[token x]"
bad_user_file "a [key] section without a pkcs11: URI" "$U:1: [key object=k]: not a valid pkcs11: URI" "[key object=k]"
bad_user_file "a section header without ']'" "$U:1: a section header is [module NAME-or-PATH]" "[module x"
bad_user_file "a global setting in a section" "$U:2: 'sign-timeout' is not a [module] setting" "[module x]" "sign-timeout 5"
bad_user_file "a session-pool too large" "$U:2: session-pool must be 1..32, not '33'" "[module x]" "session-pool 33"
long=$(printf '%*s' 5000 '' | tr ' ' x)
bad_user_file "a line too long" "$U:1: line too long (at most 4095 bytes)" "debug $long"
refused "--config naming a missing file" "p11agentd: $T/missing.conf: No such file or directory" --config "$T/missing.conf"
refused "a named module that does not exist" "--module: module $T/none.so: No such file or directory" \
	--config /dev/null --module "$T/none.so"
refused "p11agent's own front end as a module" "it is p11agent's own front end" \
	--config /dev/null --module "$T/p11agent-pkcs11.so"
admin_file "max-connections lots"
refused "a bad administrator's file" "$A:1: max-connections must be 1..65536, not 'lots'" --config /dev/null
rm -f "$A"
mkdir "$A"
refused "an administrator's file that cannot be read" "p11agentd: $A: Is a directory" --config /dev/null
rmdir "$A"

# ---------------------------------------------------------------- a failed module in status
AGENT_ARGS=(--config /dev/null --module "$TRUST" --module /usr/lib/x86_64-linux-gnu/libz.so.1)
if [ -e /usr/lib/x86_64-linux-gnu/libz.so.1 ] && start_agent; then
	run p11a status
	stdout_has "no C_GetFunctionList: not a PKCS#11 module" "status says why a module that is no PKCS#11 module failed"
	stdout_has "p11-kit-trust.so     up" "status shows a module that works as up"
else
	not_ok "agent with a module that is no PKCS#11 module starts"
fi
stop_and_reset

# ---------------------------------------------------------------- no XDG_RUNTIME_DIR: a private directory
# As nobody, whose /run/user/65534 does not exist, so that no test agent
# ever takes a real session's default path.
if [ -e /run/user/65534 ]; then
	not_ok "/run/user/65534 does not exist (this check needs a uid without a runtime directory)"
else
	chmod 0711 "$T"
	mkdir -p "$T/nobody-tmp" "$T/nobody-home"
	chown 65534:65534 "$T/nobody-tmp" "$T/nobody-home"
	run env -i PATH=/usr/bin:/bin HOME="$T/nobody-home" TMPDIR="$T/nobody-tmp" \
		P11AGENT_SYSCONFDIR="$T/etc" \
		setpriv --reuid=65534 --regid=65534 --clear-groups "$P11AGENTD" --module "$TRUST"
	rc_is 0 "eval \"\$(p11agentd)\" without XDG_RUNTIME_DIR: the agent starts"
	stderr_has "XDG_RUNTIME_DIR is not set and /run/user/65534 does not exist: using the private directory $T/nobody-tmp/p11agent-" \
		"the agent says it uses a private directory, and which"
	P11AGENT_SOCK=$(sed -n 's/^P11AGENT_SOCK=\([^;]*\);.*/\1/p' "$T/stdout")
	P11AGENT_PID=$(sed -n 's/^P11AGENT_PID=\([0-9]*\);.*/\1/p' "$T/stdout")
	[ -z "$P11AGENT_PID" ] || remember_pid "$P11AGENT_PID"
	case $P11AGENT_SOCK in
	"$T/nobody-tmp/p11agent-"*/agent.sock) ok "P11AGENT_SOCK points into the private directory" ;;
	*) not_ok "P11AGENT_SOCK points into the private directory"; diag_last ;;
	esac
	sockdir=$(dirname "$P11AGENT_SOCK")
	is "$(stat -c '%a %u' "$sockdir" 2>/dev/null)" "700 65534" "the private directory is 0700 and nobody's"
	run env -i PATH=/usr/bin:/bin HOME="$T/nobody-home" P11AGENT_SOCK="$P11AGENT_SOCK" \
		setpriv --reuid=65534 --regid=65534 --clear-groups timeout 20 "$P11AGENT" status
	rc_is 0 "p11agent status finds the agent through P11AGENT_SOCK"
	if [ -n "$P11AGENT_PID" ]; then
		stop_pid "$P11AGENT_PID"
		check "the private directory is removed when the agent exits" test ! -e "$sockdir"
	else
		not_ok "the agent printed P11AGENT_PID"
	fi

	# ---------------------------------------------------------------- the user's p11-kit registry
	# (p11-kit reads no user registry for root: this part runs as nobody too.)
	NH=$T/nobody-home
	RD=$NH/.config/pkcs11/modules
	mkdir -p "$RD"
	# (Not p11-kit-trust.so: a module of that name is trust-only whatever its file says.)
	printf 'module: %s\n' "$SOFTOKN" >"$RD/mine.module"
	printf 'module: %s\nx-init-reserved: from-registry\n' "$SOFTOKN" >"$RD/softhsm2.module"
	printf 'module: %s\ndisable-in: p11agentd other\n' "$SOFTOKN" >"$RD/off.module"
	printf 'module: %s\nenable-in: firefox\n' "$SOFTOKN" >"$RD/elsewhere.module"
	printf 'this is no module file\n' >"$RD/bad.module"
	printf 'module: %s\n' "$SOFTOKN" >"$RD/README"
	chown -R 65534:65534 "$NH"
	nobody_pc() {
		run env -i PATH=/usr/bin:/bin HOME="$NH" P11AGENT_SYSCONFDIR="$T/etc" \
			setpriv --reuid=65534 --regid=65534 --clear-groups "$P11AGENTD" --print-config
	}
	nobody_pc
	rc_is 0 "--print-config as nobody with a registry of their own"
	stdout_has "module $SOFTOKN$TAB# p11-kit registry $RD/mine.module" "a module of the user's registry"
	stdout_has "module $SOFTOKN$TAB# p11-kit registry $RD/softhsm2.module" \
		"the user's file of the same name overrides the system's module path"
	pc_module_line "x-init-reserved of a registered module" softhsm2 init-args from-registry \
		"p11-kit registry $RD/softhsm2.module"
	stdout_has "# not used: off ($SOFTOKN, p11-kit registry $RD/off.module): disabled for p11agentd" \
		"disable-in: p11agentd leaves the module out"
	stdout_has "# not used: elsewhere ($SOFTOKN, p11-kit registry $RD/elsewhere.module): disabled for p11agentd" \
		"enable-in without p11agentd leaves the module out"
	stderr_has "$RD/bad.module:1: not a 'name: value' line; ignoring the file" "a broken module file is named and skipped"
	stdout_has "p11-kit registry $OPENSC_MODULE_FILE" "with user-config merge, the system's modules are there too"
	file_lacks "$T/stdout" "README" "files not named NAME.module are not module files"
	printf 'user-config: only\n' >"$NH/.config/pkcs11/pkcs11.conf"
	chown 65534:65534 "$NH/.config/pkcs11/pkcs11.conf"
	nobody_pc
	file_lacks "$T/stdout" "$OPENSC_MODULE_FILE" "user-config: only leaves the system's modules out"
	stdout_has "module $SOFTOKN$TAB# p11-kit registry $RD/mine.module" "user-config: only keeps the user's"
	# As root, p11-kit reads no user registry; neither does the agent.
	run env HOME="$NH" "$P11AGENTD" --config /dev/null --print-config
	file_lacks "$T/stdout" "$RD" "root: the user's registry is not read"
fi

done_testing
