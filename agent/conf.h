/*
 * Agent configuration, in layers (docs/p11agentd.conf.5 is the reference):
 *
 *   built-in defaults
 *   < the administrator's file   SYSCONFDIR/p11agent/p11agentd.conf
 *   < the user's file            $XDG_CONFIG_HOME/p11agent/p11agentd.conf,
 *                                 or the file given with --config
 *   < command-line flags.
 *
 * The administrator's file alone may restrict modules (module-allow) and
 * lock settings (lock): a later layer that tries to change a locked
 * setting is an error naming its file and line, or its flag.  Every
 * effective value remembers where it came from, for --print-config.
 *
 * Errors are printed to stderr as "p11agentd: FILE:LINE: reason" (or
 * "p11agentd: --flag: reason"); a caller that gets -1 must not start.
 */
#ifndef AGENT_CONF_H
#define AGENT_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define CONFIG_MAX_MODULES 32
#define PINENTRY_DEFAULT "/usr/bin/pinentry"
#define CONFIG_POOL_MAX 32       /* = TOKEN_POOL_MAX, the most sessions a pool holds */

enum conf_layer {
	CONF_DEFAULT,
	CONF_ADMIN,
	CONF_USER,
	CONF_FLAG,
	CONF_REGISTRY            /* a module found in p11-kit's registry */
};

/* The settings a layer sets and the administrator can lock. */
enum conf_setting {
	SET_SOCKET,
	SET_MODULE,              /* module lines, module-init-args, --module, init-args */
	SET_MODULE_SKIP,
	SET_SESSION_POOL,        /* session-pool, globally and in [module] sections */
	SET_SIGN_TIMEOUT,
	SET_MAX_CONNECTIONS,
	SET_MAX_CHANNELS_PER_CONNECTION,
	SET_MAX_CHANNELS_PER_PROCESS,
	SET_DEBUG,
	SET_IDLE_LOCK,           /* idle-lock: lock a token after this long without a signature */
	SET_PIN_TTL,             /* pin-ttl: lock a token this long after its unlock */
	SET_TLS_ONLY,            /* tls-only, globally and in [key] sections */
	SET_ALLOW_PROGRAMS,      /* allow-programs, globally and in [key] sections */
	SET_FORWARDING,          /* forwarding, globally and in [key] sections */
	/* logind (agent/logind.c): lock every token on these events */
	SET_LOCK_ON_SUSPEND,     /* lock-on-suspend: PrepareForSleep(true) */
	SET_LOCK_ON_SCREEN_LOCK, /* lock-on-screen-lock: our session's Lock or LockedHint */
	SET_AUDIT,               /* audit: where audit events go (agent/audit.c) */
	SET_AUDIT_RING,          /* audit-ring: events kept for `p11agent log` */
	SET_PINENTRY_PROGRAM,    /* pinentry-program: the PIN and confirm dialog */
	SET_CONFIRM,             /* confirm, globally and in [key] sections */
	SET_KEEP_CONTEXT_PIN,    /* keep-context-pin, in [key] sections */
	SET_COUNT
};

struct conf_origin {
	enum conf_layer layer;
	const char *file;        /* owned by the agent_config (interned), or NULL */
	int line;                /* 0 when not from a file line */
	const char *note;        /* a flag ("--socket") or what a default came from; static */
};

struct module_conf {
	char *path;              /* absolute path, as configured or registered */
	char *load_path;         /* what the helper dlopen()s: the real path that was checked */
	char *name;              /* short name for logs (p11-kit name or basename) */
	char *init_args;         /* pReserved string for C_Initialize, or NULL */
	int session_pool;        /* signing sessions per token at most, 1..CONFIG_POOL_MAX */
	int64_t idle_lock_ms;    /* idle-lock for this module's tokens (global or [module]); 0 off */
	int64_t pin_ttl_ms;      /* pin-ttl likewise */
	struct conf_origin origin, init_origin, pool_origin, idle_origin, ttl_origin;
};

/* module-allow and module-skip lines. */
struct conf_pattern {
	char *text;
	struct conf_origin origin;
};

/* A [module NAME-or-PATH] section. */
struct conf_section {
	char *match;
	char *init_args;         /* NULL = not set here */
	int session_pool;        /* 0 = not set here */
	int has_idle_lock, has_pin_ttl;
	int64_t idle_lock_ms, pin_ttl_ms;
	struct conf_origin origin, init_origin, pool_origin, idle_origin, ttl_origin;
};

/*
 * A [key URI-PATTERN] section: per-key policy.  A key's setting is that
 * of the last section whose pattern matches the key's URI (files in
 * layer order, sections in file order) and sets it, else the global
 * default.
 */
/* allow-programs: absolute paths of executables; set = 0: not set (any program). */
struct conf_programs {
	int set;
	char **paths;
	size_t n;
	enum conf_layer layer;   /* of the lines listed (a higher layer's replace them) */
	struct conf_origin origin;   /* the last line */
};

/* forwarding: what a forwarded connection (ssh -R, a relay) may do with a key. */
enum conf_forwarding {
	CONF_FORWARDING_ALLOW = 0,
	CONF_FORWARDING_CONFIRM = 1,     /* ask the user each time (needs a PIN dialog) */
	CONF_FORWARDING_DENY = 2
};

/* confirm: who must say yes before a key signs (pinentry CONFIRM). */
enum conf_confirm {
	CONFIRM_NO = 0,
	CONFIRM_ONCE = 1,        /* the first signing channel of each client process */
	CONFIRM_ALWAYS = 2       /* every signature */
};

struct conf_keysec {
	char *pattern;           /* a pkcs11: URI, matched as SIGN matches key URIs */
	int tls_only;            /* -1 = not set here, else 0/1 */
	int forwarding;          /* -1 = not set here, else enum conf_forwarding */
	int confirm;             /* -1 = not set here, else enum conf_confirm */
	int keep_context_pin;    /* -1 = not set here, else 0/1 */
	struct conf_programs programs;
	struct conf_origin origin, tls_origin, fwd_origin, confirm_origin, keep_origin;
};

/* A module that was found but is not used, and why (--print-config, status). */
struct conf_dropped {
	char *name;
	char *path;
	char *why;
	struct conf_origin origin;   /* where it was found */
};

/* audit: auto = the journal when one runs, else syslog. */
enum conf_audit { CONF_AUDIT_AUTO, CONF_AUDIT_JOURNAL, CONF_AUDIT_SYSLOG, CONF_AUDIT_NONE };
#define CONFIG_AUDIT_RING_DEFAULT 1000
#define CONFIG_AUDIT_RING_MAX     100000

struct agent_config {
	char *socket_path;
	char *socket_tmpdir;     /* private directory the agent made for its socket, or NULL */
	int socket_activated;    /* the listening socket came from systemd: never unlink it */
	int foreground;
	int debug;
	int session_pool;
	int sign_timeout_ms;
	int max_connections;
	int max_channels_per_connection;
	int max_channels_per_process;
	int64_t idle_lock_ms;    /* 0 = off */
	int64_t pin_ttl_ms;      /* 0 = off */
	/* logind events (agent/logind.c); both 0: the system bus is not used */
	int lock_on_suspend;     /* default 1 */
	int lock_on_screen_lock; /* default 1 */
	int audit;               /* enum conf_audit: where audit events go; default auto */
	int audit_ring;          /* events the agent keeps in memory; default 1000 */
	struct conf_origin origin[SET_COUNT];
	int locked[SET_COUNT];
	struct conf_origin lock_origin[SET_COUNT];

	size_t nmodules;
	struct module_conf modules[CONFIG_MAX_MODULES];
	enum conf_layer modules_layer;   /* the layer whose module lines are in modules[] */
	int modules_from_registry;       /* no module given: p11-kit's registry */

	struct conf_pattern *allow, *skip;
	size_t nallow, nskip;
	struct conf_section *sections;
	size_t nsections;
	struct conf_dropped *dropped;
	size_t ndropped;

	char *pinentry_program;          /* absolute path; default PINENTRY_DEFAULT */
	int confirm;                     /* enum conf_confirm: the default for keys */
	int tls_only;                    /* the default for keys no [key] section sets */
	int forwarding;                  /* likewise; enum conf_forwarding, default allow */
	struct conf_programs allow_programs; /* likewise */
	struct conf_keysec *keysecs;
	size_t nkeysecs;

	char *admin_file, *user_file;    /* the paths looked at */
	int admin_state, user_state;     /* CONF_FILE_* */
	char **interned;
	size_t ninterned;
};

enum { CONF_FILE_NONE, CONF_FILE_MISSING, CONF_FILE_READ };

void config_init(struct agent_config *cfg);
void config_free(struct agent_config *cfg);

/*
 * The administrator's file: $P11AGENT_SYSCONFDIR/p11agent/p11agentd.conf
 * when that variable is set (tests; ignored in a setuid process), else
 * SYSCONFDIR/p11agent/p11agentd.conf.  The user's file:
 * $XDG_CONFIG_HOME/p11agent/p11agentd.conf (absolute XDG_CONFIG_HOME
 * only), else ~/.config/p11agent/p11agentd.conf.  0, or -1 when the path
 * does not fit or there is no home directory (the user's file is then
 * not read).
 */
int config_admin_path(char *out, size_t out_size);
int config_user_path(char *out, size_t out_size);

/*
 * Reads FILE as the given layer (CONF_ADMIN or CONF_USER).  A missing
 * file is no error unless must_exist; any other problem is, printed as
 * "p11agentd: FILE:LINE: reason".  Returns 0 or -1.
 */
int config_load_file(struct agent_config *cfg, const char *file, enum conf_layer layer,
		     int must_exist);

/*
 * A command-line flag: flag is its name for messages ("--socket").
 * config_flag_module() collects --module paths (the first replaces the
 * modules of every file).  -1 (printed) when the setting is locked or the
 * value is bad.
 */
int config_flag_socket(struct agent_config *cfg, const char *path, const char *flag);
int config_flag_debug(struct agent_config *cfg, const char *flag);
int config_flag_module(struct agent_config *cfg, const char *path, const char *flag);

/*
 * Adds a module (strings copied).  o says where it came from; a module
 * line of a higher layer than those already listed replaces them.
 * -1 with a message naming o when full or the path is not absolute.
 */
int config_add_module(struct agent_config *cfg, const char *path, const char *name,
		      const char *init_args, const struct conf_origin *o);

/* Records a module that is not used (copied). */
int config_add_dropped(struct agent_config *cfg, const char *name, const char *path,
		       const char *why, const struct conf_origin *o);

/* Copies s into the configuration; the copy lives as long as cfg.  NULL when out of memory. */
const char *config_intern(struct agent_config *cfg, const char *s);

/* "default", "FILE:LINE", "--socket", "p11-kit registry FILE"... */
void config_origin_format(const struct conf_origin *o, char *out, size_t out_size);

/* Prints every effective value with its source, in the file's syntax. */
void config_print(const struct agent_config *cfg, FILE *out);

/*
 * Durations (idle-lock, pin-ttl): "off" or 0 = off (0 ms); else a whole
 * number with a unit s, m or h ("90s", "5m", "2h"); a plain number is
 * minutes.  At most CONFIG_DURATION_MAX_MS.  0, or -1 for anything else.
 */
#define CONFIG_DURATION_MAX_MS ((int64_t)7 * 24 * 3600 * 1000)
int config_parse_duration(const char *text, int64_t *ms);
/* "off", "90s", "5m", "2h": the largest unit that is exact. */
void config_format_duration(int64_t ms, char *out, size_t out_size);

/* "no", "once", "always". */
const char *config_confirm_name(int confirm);

/*
 * The confirm setting of a key (its URI as the inventory lists it, with
 * its token): the last [key] section matching it that sets confirm, else
 * the default.  Patterns were checked at load.
 */
struct p11a_token;
struct p11a_key;
/* The forwarding setting (enum conf_forwarding) that applies to key. */
int config_key_forwarding(const struct agent_config *cfg, const struct p11a_token *tok,
			  const struct p11a_key *key);
int config_key_confirm(const struct agent_config *cfg, const struct p11a_token *tok,
		       const struct p11a_key *key);

/* The name of a setting as written in files ("sign-timeout"). */
const char *config_setting_name(enum conf_setting s);

/* "allow", "confirm" or "deny". */
const char *config_forwarding_name(int v);

#endif
