/* Agent configuration: layered files and flags, locks, and where each value came from. */
#include "config.h"
#include "conf.h"
#include "paths.h"
#include "p11a.h"
#include "uri.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

static const char *const setting_names[SET_COUNT] = {
	[SET_SOCKET] = "socket",
	[SET_MODULE] = "module",
	[SET_MODULE_SKIP] = "module-skip",
	[SET_SESSION_POOL] = "session-pool",
	[SET_SIGN_TIMEOUT] = "sign-timeout",
	[SET_MAX_CONNECTIONS] = "max-connections",
	[SET_MAX_CHANNELS_PER_CONNECTION] = "max-channels-per-connection",
	[SET_MAX_CHANNELS_PER_PROCESS] = "max-channels-per-process",
	[SET_DEBUG] = "debug",
	[SET_IDLE_LOCK] = "idle-lock",
	[SET_PIN_TTL] = "pin-ttl",
	[SET_TLS_ONLY] = "tls-only",
	[SET_ALLOW_PROGRAMS] = "allow-programs",
	[SET_FORWARDING] = "forwarding",
	[SET_LOCK_ON_SUSPEND] = "lock-on-suspend",
	[SET_LOCK_ON_SCREEN_LOCK] = "lock-on-screen-lock",
	[SET_PINENTRY_PROGRAM] = "pinentry-program",
	[SET_CONFIRM] = "confirm",
	[SET_KEEP_CONTEXT_PIN] = "keep-context-pin",
	[SET_AUDIT] = "audit",
	[SET_AUDIT_RING] = "audit-ring",
};

static const char *const audit_names[] = {
	[CONF_AUDIT_AUTO] = "auto", [CONF_AUDIT_JOURNAL] = "journal",
	[CONF_AUDIT_SYSLOG] = "syslog", [CONF_AUDIT_NONE] = "none",
};

const char *
config_setting_name(enum conf_setting s)
{
	return (unsigned)s < SET_COUNT ? setting_names[s] : "?";
}

void
config_init(struct agent_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->session_pool = CONFIG_POOL_MAX;
	cfg->sign_timeout_ms = P11A_SIGN_TIMEOUT_MS;
	cfg->max_connections = 1024;
	cfg->max_channels_per_connection = 64;
	cfg->max_channels_per_process = 256;
	cfg->lock_on_suspend = 1;
	cfg->lock_on_screen_lock = 1;
	cfg->audit = CONF_AUDIT_AUTO;
	cfg->audit_ring = CONFIG_AUDIT_RING_DEFAULT;
	for (int i = 0; i < SET_COUNT; i++)
		cfg->origin[i].layer = CONF_DEFAULT;
	cfg->modules_layer = CONF_DEFAULT;
}

static void
module_conf_clear(struct module_conf *m)
{
	free(m->path);
	free(m->load_path);
	free(m->name);
	free(m->init_args);
	memset(m, 0, sizeof(*m));
}

static void
programs_clear(struct conf_programs *pr)
{
	for (size_t i = 0; i < pr->n; i++)
		free(pr->paths[i]);
	free(pr->paths);
	memset(pr, 0, sizeof(*pr));
}

void
config_free(struct agent_config *cfg)
{
	free(cfg->socket_path);
	free(cfg->socket_tmpdir);
	for (size_t i = 0; i < cfg->nmodules; i++)
		module_conf_clear(&cfg->modules[i]);
	for (size_t i = 0; i < cfg->nallow; i++)
		free(cfg->allow[i].text);
	free(cfg->allow);
	for (size_t i = 0; i < cfg->nskip; i++)
		free(cfg->skip[i].text);
	free(cfg->skip);
	for (size_t i = 0; i < cfg->nsections; i++) {
		free(cfg->sections[i].match);
		free(cfg->sections[i].init_args);
	}
	free(cfg->sections);
	for (size_t i = 0; i < cfg->ndropped; i++) {
		free(cfg->dropped[i].name);
		free(cfg->dropped[i].path);
		free(cfg->dropped[i].why);
	}
	free(cfg->dropped);
	for (size_t i = 0; i < cfg->nkeysecs; i++) {
		free(cfg->keysecs[i].pattern);
		programs_clear(&cfg->keysecs[i].programs);
	}
	free(cfg->keysecs);
	programs_clear(&cfg->allow_programs);
	free(cfg->pinentry_program);
	free(cfg->admin_file);
	free(cfg->user_file);
	for (size_t i = 0; i < cfg->ninterned; i++)
		free(cfg->interned[i]);
	free(cfg->interned);
	memset(cfg, 0, sizeof(*cfg));
}

const char *
config_intern(struct agent_config *cfg, const char *s)
{
	for (size_t i = 0; i < cfg->ninterned; i++)
		if (strcmp(cfg->interned[i], s) == 0)
			return cfg->interned[i];
	char **n = realloc(cfg->interned, (cfg->ninterned + 1) * sizeof(*n));
	if (!n)
		return NULL;
	cfg->interned = n;
	if (!(n[cfg->ninterned] = strdup(s)))
		return NULL;
	return n[cfg->ninterned++];
}

void
config_origin_format(const struct conf_origin *o, char *out, size_t out_size)
{
	switch (o->layer) {
	case CONF_DEFAULT:
		if (o->note)
			snprintf(out, out_size, "default (%s)", o->note);
		else
			snprintf(out, out_size, "default");
		break;
	case CONF_ADMIN:
	case CONF_USER:
		if (o->line > 0)
			snprintf(out, out_size, "%s:%d", o->file ? o->file : "?", o->line);
		else
			snprintf(out, out_size, "%s", o->file ? o->file : "?");
		break;
	case CONF_FLAG:
		snprintf(out, out_size, "%s", o->note ? o->note : "command line");
		break;
	case CONF_REGISTRY:
		snprintf(out, out_size, "p11-kit registry %s", o->file ? o->file : "");
		break;
	}
}

/* "p11agentd: WHERE: why" on stderr; returns -1. */
static int __attribute__((format(printf, 2, 3)))
origin_err(const struct conf_origin *o, const char *fmt, ...)
{
	char where[PATH_MAX + 64], why[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	config_origin_format(o, where, sizeof(where));
	fprintf(stderr, "p11agentd: %s: %s\n", where, why);
	return -1;
}

/* -1 (printed) when a layer above the administrator's touches a locked setting. */
static int
check_lock(const struct agent_config *cfg, enum conf_setting s, const char *key,
	   const struct conf_origin *o)
{
	char where[PATH_MAX + 64];

	if (o->layer == CONF_ADMIN || o->layer == CONF_DEFAULT || !cfg->locked[s])
		return 0;
	config_origin_format(&cfg->lock_origin[s], where, sizeof(where));
	return origin_err(o, "'%s' is locked by the administrator (%s)", key, where);
}

int
config_add_module(struct agent_config *cfg, const char *path, const char *name,
		  const char *init_args, const struct conf_origin *o)
{
	if (path[0] != '/')
		return origin_err(o, "module path '%s' is not absolute (write the full path of "
				  "the .so file; to use modules registered with p11-kit, give no "
				  "module line and name unwanted ones with module-skip)", path);
	if (o->layer != CONF_REGISTRY && o->layer > cfg->modules_layer) {
		/* The module lines of a higher layer replace those below it. */
		for (size_t i = 0; i < cfg->nmodules; i++)
			module_conf_clear(&cfg->modules[i]);
		cfg->nmodules = 0;
		cfg->modules_layer = o->layer;
	}
	if (cfg->nmodules >= CONFIG_MAX_MODULES)
		return origin_err(o, "too many modules (at most %d)", CONFIG_MAX_MODULES);
	struct module_conf *m = &cfg->modules[cfg->nmodules];
	const char *base = strrchr(path, '/');
	memset(m, 0, sizeof(*m));
	m->path = strdup(path);
	m->name = strdup(name && *name ? name : base + 1);
	m->init_args = init_args ? strdup(init_args) : NULL;
	if (!m->path || !m->name || (init_args && !m->init_args)) {
		module_conf_clear(m);
		return origin_err(o, "out of memory");
	}
	m->origin = *o;
	/* Without init args the module's init-args is still a default. */
	m->init_origin = init_args ? *o : (struct conf_origin){ .layer = CONF_DEFAULT };
	cfg->nmodules++;
	if (o->layer != CONF_REGISTRY)
		cfg->origin[SET_MODULE] = *o;
	return 0;
}

int
config_add_dropped(struct agent_config *cfg, const char *name, const char *path,
		   const char *why, const struct conf_origin *o)
{
	struct conf_dropped *n = realloc(cfg->dropped, (cfg->ndropped + 1) * sizeof(*n));
	if (!n)
		return -1;
	cfg->dropped = n;
	n += cfg->ndropped;
	memset(n, 0, sizeof(*n));
	n->name = strdup(name ? name : "");
	n->path = strdup(path ? path : "");
	n->why = strdup(why);
	n->origin = *o;
	if (!n->name || !n->path || !n->why) {
		free(n->name);
		free(n->path);
		free(n->why);
		return -1;
	}
	cfg->ndropped++;
	return 0;
}

static int
add_pattern(struct conf_pattern **list, size_t *n, const char *text, const struct conf_origin *o)
{
	struct conf_pattern *l = realloc(*list, (*n + 1) * sizeof(*l));
	if (!l)
		return -1;
	*list = l;
	if (!(l[*n].text = strdup(text)))
		return -1;
	l[*n].origin = *o;
	(*n)++;
	return 0;
}

/* ------------------------------------------------------------ paths */

int
config_admin_path(char *out, size_t out_size)
{
	const char *dir = secure_getenv("P11AGENT_SYSCONFDIR");
	int n;

	if (!dir || !*dir)
		dir = P11A_SYSCONFDIR;
	n = snprintf(out, out_size, "%s/p11agent/p11agentd.conf", dir);
	return n < 0 || (size_t)n >= out_size ? -1 : 0;
}

int
config_user_path(char *out, size_t out_size)
{
	const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
	int n;

	/* The XDG base directory spec ignores a relative XDG_CONFIG_HOME. */
	if (xdg && xdg[0] == '/')
		n = snprintf(out, out_size, "%s/p11agent/p11agentd.conf", xdg);
	else {
		if (!home || home[0] != '/') {
			struct passwd *pw = getpwuid(getuid());
			home = pw ? pw->pw_dir : NULL;
		}
		if (!home || home[0] != '/')
			return -1;
		n = snprintf(out, out_size, "%s/.config/p11agent/p11agentd.conf", home);
	}
	return n < 0 || (size_t)n >= out_size ? -1 : 0;
}

/* ------------------------------------------------------------ files */

#define CONF_LINE_MAX 4095

struct parse {
	struct agent_config *cfg;
	enum conf_layer layer;
	struct conf_origin at;   /* file and current line */
	long section;            /* index into cfg->sections, or -1 before any section */
	long keysec;             /* index into cfg->keysecs when in a [key] section, else -1 */
	long last_module;        /* index of this file's latest module line, or -1 */
};

static int __attribute__((format(printf, 2, 3)))
perr(const struct parse *p, const char *fmt, ...)
{
	char why[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return origin_err(&p->at, "%s", why);
}

static char *
trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	size_t n = strlen(s);
	while (n > 0 && isspace((unsigned char)s[n - 1]))
		s[--n] = '\0';
	return s;
}

static int
parse_int(const char *v, int min, int max, int *out)
{
	char *end;
	errno = 0;
	long n = strtol(v, &end, 10);
	if (errno || *end || end == v || n < min || n > max)
		return -1;
	*out = (int)n;
	return 0;
}

/* An integer setting: checked, lock-checked, stored with its origin. */
static int
set_int(struct parse *p, enum conf_setting s, const char *val, int min, int max, int scale,
	int *field, const char *unit)
{
	int v;

	if (check_lock(p->cfg, s, setting_names[s], &p->at) != 0)
		return -1;
	if (parse_int(val, min, max, &v) != 0)
		return perr(p, "%s must be %d..%d%s%s, not '%s'", setting_names[s], min, max,
			    unit ? " " : "", unit ? unit : "", val);
	*field = v * scale;
	p->cfg->origin[s] = p->at;
	return 0;
}

/* ------------------------------------------------------------ durations (locking) */

int
config_parse_duration(const char *text, int64_t *ms)
{
	int64_t unit = 60 * 1000;       /* a plain number is minutes */
	const char *v = text;
	int64_t n = 0;

	if (strcmp(text, "off") == 0) {
		*ms = 0;
		return 0;
	}
	if (!isdigit((unsigned char)*v))
		return -1;
	for (; isdigit((unsigned char)*v); v++) {
		n = n * 10 + (*v - '0');
		if (n > CONFIG_DURATION_MAX_MS / 1000)
			return -1;
	}
	if (*v != '\0') {
		if (v[1] != '\0')
			return -1;
		switch (*v) {
		case 's': unit = 1000; break;
		case 'm': unit = 60 * 1000; break;
		case 'h': unit = 3600 * 1000; break;
		default: return -1;
		}
	}
	if (n * unit > CONFIG_DURATION_MAX_MS)
		return -1;
	*ms = n * unit;
	return 0;
}

void
config_format_duration(int64_t ms, char *out, size_t out_size)
{
	if (ms <= 0)
		snprintf(out, out_size, "off");
	else if (ms % (3600 * 1000) == 0)
		snprintf(out, out_size, "%lldh", (long long)(ms / (3600 * 1000)));
	else if (ms % (60 * 1000) == 0)
		snprintf(out, out_size, "%lldm", (long long)(ms / (60 * 1000)));
	else
		snprintf(out, out_size, "%llds", (long long)((ms + 999) / 1000));
}

/* A duration setting (idle-lock, pin-ttl): checked, lock-checked, stored with its origin. */
static int
set_duration(struct parse *p, enum conf_setting s, const char *val, int64_t *field)
{
	if (check_lock(p->cfg, s, setting_names[s], &p->at) != 0)
		return -1;
	if (config_parse_duration(val, field) != 0)
		return perr(p, "%s must be off, 0, or a whole number of minutes, or of seconds, "
			    "minutes or hours with s, m or h (\"90s\", \"5m\", \"1h\"; at most "
			    "168h), not '%s'", setting_names[s], val);
	p->cfg->origin[s] = p->at;
	return 0;
}

/* A yes/no setting (lock-on-suspend, lock-on-screen-lock): lock-checked, stored with its origin. */
static int
set_yes_no(struct parse *p, enum conf_setting s, const char *val, int *field)
{
	if (check_lock(p->cfg, s, setting_names[s], &p->at) != 0)
		return -1;
	if (strcmp(val, "yes") == 0)
		*field = 1;
	else if (strcmp(val, "no") == 0)
		*field = 0;
	else
		return perr(p, "%s must be yes or no, not '%s'", setting_names[s], val);
	p->cfg->origin[s] = p->at;
	return 0;
}

/* Replaces *field with a copy of val and records the line it came from. */
static int
set_text(struct parse *p, char **field, struct conf_origin *origin, const char *val)
{
	char *copy = strdup(val);

	if (!copy)
		return perr(p, "out of memory");
	free(*field);
	*field = copy;
	*origin = p->at;
	return 0;
}

/* ------------------------------------------------------------ [key] sections: per-key policy */

/* "yes" or "no" into *out; -1 otherwise. */
static int
parse_bool(const char *v, int *out)
{
	if (strcmp(v, "yes") == 0)
		*out = 1;
	else if (strcmp(v, "no") == 0)
		*out = 0;
	else
		return -1;
	return 0;
}

static int
keysec_begin(struct parse *p, const char *arg)
{
	struct agent_config *cfg = p->cfg;
	struct p11a_uri_matcher *um;
	int err = 0;

	if (!*arg)
		return perr(p, "[key] needs a pkcs11: URI pattern (e.g. [key pkcs11:token=Work;"
			    "object=Auth])");
	if ((um = p11a_uri_matcher_new(arg, &err)) == NULL)
		return perr(p, "[key %s]: not a valid pkcs11: URI", arg);
	p11a_uri_matcher_free(um);
	struct conf_keysec *l = realloc(cfg->keysecs, (cfg->nkeysecs + 1) * sizeof(*l));
	if (!l)
		return perr(p, "out of memory");
	cfg->keysecs = l;
	l += cfg->nkeysecs;
	memset(l, 0, sizeof(*l));
	if (!(l->pattern = strdup(arg)))
		return perr(p, "out of memory");
	l->tls_only = -1;
	l->forwarding = -1;
	l->confirm = -1;
	l->keep_context_pin = -1;
	l->origin = p->at;
	p->keysec = (long)cfg->nkeysecs++;
	p->section = -1;
	return 0;
}

/* tls-only, globally (keysec NULL) or in a [key] section: lock-checked. */
static int
set_tls_only(struct parse *p, struct conf_keysec *ks, const char *val)
{
	int v;

	if (check_lock(p->cfg, SET_TLS_ONLY, "tls-only", &p->at) != 0)
		return -1;
	if (parse_bool(val, &v) != 0)
		return perr(p, "tls-only must be yes or no, not '%s'", val);
	if (ks != NULL) {
		ks->tls_only = v;
		ks->tls_origin = p->at;
	} else {
		p->cfg->tls_only = v;
		p->cfg->origin[SET_TLS_ONLY] = p->at;
	}
	return 0;
}

const char *
config_forwarding_name(int v)
{
	return v == CONF_FORWARDING_DENY ? "deny" : v == CONF_FORWARDING_CONFIRM ? "confirm" : "allow";
}

/* forwarding, globally (keysec NULL) or in a [key] section: lock-checked. */
static int
set_forwarding(struct parse *p, struct conf_keysec *ks, const char *val)
{
	int v;

	if (check_lock(p->cfg, SET_FORWARDING, "forwarding", &p->at) != 0)
		return -1;
	if (strcmp(val, "allow") == 0)
		v = CONF_FORWARDING_ALLOW;
	else if (strcmp(val, "confirm") == 0)
		v = CONF_FORWARDING_CONFIRM;
	else if (strcmp(val, "deny") == 0)
		v = CONF_FORWARDING_DENY;
	else
		return perr(p, "forwarding must be allow, confirm or deny, not '%s'", val);
	if (ks != NULL) {
		ks->forwarding = v;
		ks->fwd_origin = p->at;
	} else {
		p->cfg->forwarding = v;
		p->cfg->origin[SET_FORWARDING] = p->at;
	}
	return 0;
}

/*
 * allow-programs, globally (keysec NULL) or in a [key] section:
 * lock-checked; the paths of a line add to those of earlier lines of the
 * same layer and replace those of a lower layer.
 */
static int
set_allow_programs(struct parse *p, struct conf_keysec *ks, char *val)
{
	struct conf_programs *pr = ks != NULL ? &ks->programs : &p->cfg->allow_programs;
	char *words[64], *save = NULL;
	size_t nw = 0;

	if (check_lock(p->cfg, SET_ALLOW_PROGRAMS, "allow-programs", &p->at) != 0)
		return -1;
	for (char *w = strtok_r(val, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
		if (w[0] != '/')
			return perr(p, "allow-programs takes absolute paths of executables (as "
				    "/proc/PID/exe shows them: readlink -f \"$(command -v NAME)\"), "
				    "not '%s'", w);
		if (nw == sizeof(words) / sizeof(words[0]))
			return perr(p, "allow-programs: more than %zu paths on one line; write "
				    "several lines", nw);
		words[nw++] = w;
	}
	if (nw == 0)
		return perr(p, "allow-programs needs at least one absolute path");
	if (pr->set && pr->layer != p->layer)
		programs_clear(pr);     /* a higher layer's list replaces a lower one's */
	char **n = realloc(pr->paths, (pr->n + nw) * sizeof(*n));
	if (n == NULL)
		return perr(p, "out of memory");
	pr->paths = n;
	for (size_t i = 0; i < nw; i++) {
		if ((n[pr->n] = strdup(words[i])) == NULL)
			return perr(p, "out of memory");
		pr->n++;
	}
	pr->set = 1;
	pr->layer = p->layer;
	pr->origin = p->at;
	if (ks == NULL)
		p->cfg->origin[SET_ALLOW_PROGRAMS] = p->at;
	return 0;
}

const char *
config_confirm_name(int confirm)
{
	return confirm == CONFIRM_ALWAYS ? "always" : confirm == CONFIRM_ONCE ? "once" : "no";
}

/* confirm, globally (keysec NULL) or in a [key] section: lock-checked. */
static int
set_confirm(struct parse *p, struct conf_keysec *ks, const char *val)
{
	int v;

	if (check_lock(p->cfg, SET_CONFIRM, "confirm", &p->at) != 0)
		return -1;
	if (strcmp(val, "no") == 0)
		v = CONFIRM_NO;
	else if (strcmp(val, "once") == 0)
		v = CONFIRM_ONCE;
	else if (strcmp(val, "always") == 0)
		v = CONFIRM_ALWAYS;
	else
		return perr(p, "confirm must be no, once or always, not '%s'", val);
	if (ks != NULL) {
		ks->confirm = v;
		ks->confirm_origin = p->at;
	} else {
		p->cfg->confirm = v;
		p->cfg->origin[SET_CONFIRM] = p->at;
	}
	return 0;
}

/*
 * An int setting of the [key] sections for key: the last section that
 * matches and sets it (the field at offset off, -1 = not set) wins over
 * dflt.
 */
static int
keysec_int(const struct agent_config *cfg, const struct p11a_token *tok,
	   const struct p11a_key *key, int dflt, size_t off)
{
	int v = dflt;

	for (size_t i = 0; i < cfg->nkeysecs; i++) {
		const struct conf_keysec *ks = &cfg->keysecs[i];
		int set = *(const int *)(const void *)((const char *)ks + off);
		struct p11a_uri_matcher *um;
		int err = 0;

		if (set < 0 || (um = p11a_uri_matcher_new(ks->pattern, &err)) == NULL)
			continue;
		if (p11a_uri_match_key(um, tok, key) == 1)
			v = set;
		p11a_uri_matcher_free(um);
	}
	return v;
}

int
config_key_confirm(const struct agent_config *cfg, const struct p11a_token *tok,
		   const struct p11a_key *key)
{
	return keysec_int(cfg, tok, key, cfg->confirm, offsetof(struct conf_keysec, confirm));
}

int
config_key_forwarding(const struct agent_config *cfg, const struct p11a_token *tok,
		      const struct p11a_key *key)
{
	return keysec_int(cfg, tok, key, cfg->forwarding, offsetof(struct conf_keysec, forwarding));
}

static int
keysec_setting(struct parse *p, const char *key, char *val)
{
	if (strcmp(key, "tls-only") == 0)
		return set_tls_only(p, &p->cfg->keysecs[p->keysec], val);
	if (strcmp(key, "allow-programs") == 0)
		return set_allow_programs(p, &p->cfg->keysecs[p->keysec], val);
	if (strcmp(key, "forwarding") == 0)
		return set_forwarding(p, &p->cfg->keysecs[p->keysec], val);
	if (strcmp(key, "confirm") == 0)
		return set_confirm(p, &p->cfg->keysecs[p->keysec], val);
	if (strcmp(key, "keep-context-pin") == 0) {
		struct conf_keysec *ks = &p->cfg->keysecs[p->keysec];
		if (check_lock(p->cfg, SET_KEEP_CONTEXT_PIN, key, &p->at) != 0)
			return -1;
		if (strcmp(val, "yes") == 0)
			ks->keep_context_pin = 1;
		else if (strcmp(val, "no") == 0)
			ks->keep_context_pin = 0;
		else
			return perr(p, "keep-context-pin must be yes or no, not '%s'", val);
		ks->keep_origin = p->at;
		return 0;
	}
	return perr(p, "'%s' is not a [key] setting (tls-only, allow-programs, forwarding, "
		    "confirm, keep-context-pin); global settings go before the first section", key);
}

static int
section_begin(struct parse *p, char *s)
{
	struct agent_config *cfg = p->cfg;
	size_t n = strlen(s);

	if (n < 2 || s[n - 1] != ']')
		return perr(p, "a section header is [module NAME-or-PATH]; this line has no "
			    "closing ']'");
	s[n - 1] = '\0';
	char *body = trim(s + 1);
	char *arg = body;
	while (*arg && !isspace((unsigned char)*arg))
		arg++;
	if (*arg)
		*arg++ = '\0';
	arg = trim(arg);
	if (strcmp(body, "key") == 0)
		return keysec_begin(p, arg);
	if (strcmp(body, "module") != 0)
		return perr(p, "unknown section [%s%s%s]; the known ones are [module NAME-or-PATH] "
			    "and [key URI-PATTERN]", body, *arg ? " " : "", arg);
	p->keysec = -1;
	if (!*arg)
		return perr(p, "[module] needs a module name (as p11-kit names it) or an "
			    "absolute path");
	struct conf_section *l = realloc(cfg->sections, (cfg->nsections + 1) * sizeof(*l));
	if (!l)
		return perr(p, "out of memory");
	cfg->sections = l;
	l += cfg->nsections;
	memset(l, 0, sizeof(*l));
	if (!(l->match = strdup(arg)))
		return perr(p, "out of memory");
	l->origin = p->at;
	p->section = (long)cfg->nsections++;
	return 0;
}

static int
section_setting(struct parse *p, const char *key, const char *val)
{
	struct conf_section *sec = &p->cfg->sections[p->section];

	if (strcmp(key, "init-args") == 0) {
		if (check_lock(p->cfg, SET_MODULE, key, &p->at) != 0)
			return -1;
		return set_text(p, &sec->init_args, &sec->init_origin, val);
	}
	if (strcmp(key, "session-pool") == 0) {
		if (check_lock(p->cfg, SET_SESSION_POOL, key, &p->at) != 0)
			return -1;
		if (parse_int(val, 1, CONFIG_POOL_MAX, &sec->session_pool) != 0)
			return perr(p, "session-pool must be 1..%d, not '%s'", CONFIG_POOL_MAX, val);
		sec->pool_origin = p->at;
		return 0;
	}
	if (strcmp(key, "idle-lock") == 0 || strcmp(key, "pin-ttl") == 0) {
		int idle = key[0] == 'i';
		enum conf_setting s = idle ? SET_IDLE_LOCK : SET_PIN_TTL;
		if (check_lock(p->cfg, s, key, &p->at) != 0)
			return -1;
		if (config_parse_duration(val, idle ? &sec->idle_lock_ms : &sec->pin_ttl_ms) != 0)
			return perr(p, "%s must be off, 0, or a whole number of minutes, or of "
				    "seconds, minutes or hours with s, m or h (\"90s\", \"5m\", "
				    "\"1h\"; at most 168h), not '%s'", key, val);
		if (idle) {
			sec->has_idle_lock = 1;
			sec->idle_origin = p->at;
		} else {
			sec->has_pin_ttl = 1;
			sec->ttl_origin = p->at;
		}
		return 0;
	}
	return perr(p, "'%s' is not a [module] setting (init-args, session-pool, idle-lock, "
		    "pin-ttl); global settings go before the first section", key);
}

static int
lock_settings(struct parse *p, char *val)
{
	char *save = NULL;

	for (char *w = strtok_r(val, " \t,", &save); w; w = strtok_r(NULL, " \t,", &save)) {
		int s;
		for (s = 0; s < SET_COUNT; s++)
			if (strcmp(w, setting_names[s]) == 0)
				break;
		if (s == SET_COUNT)
			return perr(p, "cannot lock '%s': not a setting that can be locked", w);
		p->cfg->locked[s] = 1;
		p->cfg->lock_origin[s] = p->at;
	}
	return 0;
}

static int
global_setting(struct parse *p, const char *key, char *val)
{
	struct agent_config *cfg = p->cfg;
	int admin = p->layer == CONF_ADMIN;

	if (strcmp(key, "socket") == 0) {
		if (check_lock(cfg, SET_SOCKET, key, &p->at) != 0)
			return -1;
		if (val[0] != '/')
			return perr(p, "socket path must be absolute: %s", val);
		if (strlen(val) >= sizeof(((struct sockaddr_un *)0)->sun_path))
			return perr(p, "socket path is too long for a Unix socket: %s", val);
		return set_text(p, &cfg->socket_path, &cfg->origin[SET_SOCKET], val);
	}
	if (strcmp(key, "module") == 0) {
		if (check_lock(cfg, SET_MODULE, key, &p->at) != 0)
			return -1;
		if (config_add_module(cfg, val, NULL, NULL, &p->at) != 0)
			return -1;
		p->last_module = (long)cfg->nmodules - 1;
		return 0;
	}
	if (strcmp(key, "module-init-args") == 0) {
		if (check_lock(cfg, SET_MODULE, key, &p->at) != 0)
			return -1;
		if (p->last_module < 0)
			return perr(p, "module-init-args must follow a module line of this file "
				    "(for a registered module use [module NAME] and init-args)");
		struct module_conf *m = &cfg->modules[p->last_module];
		return set_text(p, &m->init_args, &m->init_origin, val);
	}
	if (strcmp(key, "module-skip") == 0) {
		if (check_lock(cfg, SET_MODULE_SKIP, key, &p->at) != 0)
			return -1;
		if (add_pattern(&cfg->skip, &cfg->nskip, val, &p->at) != 0)
			return perr(p, "out of memory");
		cfg->origin[SET_MODULE_SKIP] = p->at;
		return 0;
	}
	if (strcmp(key, "module-allow") == 0) {
		if (!admin)
			return perr(p, "module-allow belongs in the administrator's file (%s) only",
				    cfg->admin_file ? cfg->admin_file : P11A_SYSCONFDIR "/p11agent/p11agentd.conf");
		if (val[0] != '/')
			return perr(p, "module-allow needs an absolute path or pattern: %s", val);
		if (add_pattern(&cfg->allow, &cfg->nallow, val, &p->at) != 0)
			return perr(p, "out of memory");
		return 0;
	}
	if (strcmp(key, "lock") == 0) {
		if (!admin)
			return perr(p, "lock belongs in the administrator's file (%s) only",
				    cfg->admin_file ? cfg->admin_file : P11A_SYSCONFDIR "/p11agent/p11agentd.conf");
		return lock_settings(p, val);
	}
	if (strcmp(key, "session-pool") == 0)
		return set_int(p, SET_SESSION_POOL, val, 1, CONFIG_POOL_MAX, 1, &cfg->session_pool,
			       NULL);
	if (strcmp(key, "sign-timeout") == 0)
		return set_int(p, SET_SIGN_TIMEOUT, val, 1, 3600, 1000, &cfg->sign_timeout_ms,
			       "seconds");
	if (strcmp(key, "max-connections") == 0)
		return set_int(p, SET_MAX_CONNECTIONS, val, 1, 65536, 1, &cfg->max_connections,
			       NULL);
	if (strcmp(key, "max-channels-per-connection") == 0)
		return set_int(p, SET_MAX_CHANNELS_PER_CONNECTION, val, 1, 4096, 1,
			       &cfg->max_channels_per_connection, NULL);
	if (strcmp(key, "max-channels-per-process") == 0)
		return set_int(p, SET_MAX_CHANNELS_PER_PROCESS, val, 1, 4096, 1,
			       &cfg->max_channels_per_process, NULL);
	if (strcmp(key, "idle-lock") == 0)
		return set_duration(p, SET_IDLE_LOCK, val, &cfg->idle_lock_ms);
	if (strcmp(key, "pin-ttl") == 0)
		return set_duration(p, SET_PIN_TTL, val, &cfg->pin_ttl_ms);
	if (strcmp(key, "tls-only") == 0)
		return set_tls_only(p, NULL, val);
	if (strcmp(key, "allow-programs") == 0)
		return set_allow_programs(p, NULL, val);
	if (strcmp(key, "forwarding") == 0)
		return set_forwarding(p, NULL, val);
	if (strcmp(key, "confirm") == 0)
		return set_confirm(p, NULL, val);
	if (strcmp(key, "pinentry-program") == 0) {
		if (check_lock(cfg, SET_PINENTRY_PROGRAM, key, &p->at) != 0)
			return -1;
		if (val[0] != '/')
			return perr(p, "pinentry-program needs an absolute path, not '%s'", val);
		return set_text(p, &cfg->pinentry_program, &cfg->origin[SET_PINENTRY_PROGRAM], val);
	}
	if (strcmp(key, "lock-on-suspend") == 0)
		return set_yes_no(p, SET_LOCK_ON_SUSPEND, val, &cfg->lock_on_suspend);
	if (strcmp(key, "lock-on-screen-lock") == 0)
		return set_yes_no(p, SET_LOCK_ON_SCREEN_LOCK, val, &cfg->lock_on_screen_lock);
	if (strcmp(key, "audit-ring") == 0)
		return set_int(p, SET_AUDIT_RING, val, 1, CONFIG_AUDIT_RING_MAX, 1, &cfg->audit_ring,
			       "events");
	if (strcmp(key, "audit") == 0) {
		size_t i;

		if (check_lock(cfg, SET_AUDIT, key, &p->at) != 0)
			return -1;
		for (i = 0; i < sizeof(audit_names) / sizeof(audit_names[0]); i++)
			if (strcmp(val, audit_names[i]) == 0)
				break;
		if (i == sizeof(audit_names) / sizeof(audit_names[0]))
			return perr(p, "audit must be auto, journal, syslog or none, not '%s'", val);
		cfg->audit = (int)i;
		cfg->origin[SET_AUDIT] = p->at;
		return 0;
	}
	if (strcmp(key, "debug") == 0) {
		if (check_lock(cfg, SET_DEBUG, key, &p->at) != 0)
			return -1;
		if (strcmp(val, "yes") == 0)
			cfg->debug = 1;
		else if (strcmp(val, "no") == 0)
			cfg->debug = 0;
		else
			return perr(p, "debug must be yes or no, not '%s'", val);
		cfg->origin[SET_DEBUG] = p->at;
		return 0;
	}
	if (strcmp(key, "init-args") == 0)
		return perr(p, "init-args belongs in a [module NAME-or-PATH] section (or use "
			    "module-init-args after a module line)");
	return perr(p, "unknown setting '%s'", key);
}

static int
parse_line(struct parse *p, char *line)
{
	char *hash = strchr(line, '#');
	if (hash)
		*hash = '\0';
	char *s = trim(line);
	if (!*s)
		return 0;
	if (*s == '[')
		return section_begin(p, s);
	char *val = s;
	while (*val && !isspace((unsigned char)*val))
		val++;
	if (*val)
		*val++ = '\0';
	val = trim(val);
	if (!*val)
		return perr(p, "'%s' needs a value", s);
	if (p->keysec >= 0)
		return keysec_setting(p, s, val);
	if (p->section >= 0)
		return section_setting(p, s, val);
	return global_setting(p, s, val);
}

int
config_load_file(struct agent_config *cfg, const char *file, enum conf_layer layer,
		 int must_exist)
{
	struct parse p = { .cfg = cfg, .layer = layer, .section = -1, .keysec = -1,
			   .last_module = -1 };
	int *state = layer == CONF_ADMIN ? &cfg->admin_state : &cfg->user_state;
	char **name = layer == CONF_ADMIN ? &cfg->admin_file : &cfg->user_file;

	free(*name);
	if (!(*name = strdup(file)) || !(p.at.file = config_intern(cfg, file))) {
		fprintf(stderr, "p11agentd: out of memory\n");
		return -1;
	}
	p.at.layer = layer;
	FILE *f = fopen(file, "re");
	if (!f) {
		if (errno == ENOENT && !must_exist) {
			*state = CONF_FILE_MISSING;
			return 0;
		}
		/* An administrator's file we cannot read must not be skipped: it may lock things. */
		fprintf(stderr, "p11agentd: %s: %s\n", file, strerror(errno));
		return -1;
	}
	*state = CONF_FILE_READ;
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int rc = 0;
	while ((len = getline(&line, &cap, f)) >= 0) {
		p.at.line++;
		if (len - (line[len - 1] == '\n') > CONF_LINE_MAX) {
			rc = perr(&p, "line too long (at most %d bytes)", CONF_LINE_MAX);
			break;
		}
		if (memchr(line, '\0', (size_t)len)) {
			rc = perr(&p, "NUL byte in line");
			break;
		}
		if ((rc = parse_line(&p, line)) != 0)
			break;
	}
	int err = errno;
	free(line);
	if (rc == 0 && ferror(f)) {
		fprintf(stderr, "p11agentd: %s: %s\n", file, strerror(err));
		rc = -1;
	}
	fclose(f);
	return rc;
}

/* ------------------------------------------------------------ flags */

int
config_flag_socket(struct agent_config *cfg, const char *path, const char *flag)
{
	struct conf_origin o = { .layer = CONF_FLAG, .note = flag };

	if (check_lock(cfg, SET_SOCKET, "socket", &o) != 0)
		return -1;
	if (path[0] != '/')
		return origin_err(&o, "socket path must be absolute: %s", path);
	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		return origin_err(&o, "socket path is too long for a Unix socket: %s", path);
	free(cfg->socket_path);
	if (!(cfg->socket_path = strdup(path)))
		return origin_err(&o, "out of memory");
	cfg->origin[SET_SOCKET] = o;
	return 0;
}

int
config_flag_debug(struct agent_config *cfg, const char *flag)
{
	struct conf_origin o = { .layer = CONF_FLAG, .note = flag };

	if (check_lock(cfg, SET_DEBUG, "debug", &o) != 0)
		return -1;
	cfg->debug = 1;
	cfg->origin[SET_DEBUG] = o;
	return 0;
}

int
config_flag_module(struct agent_config *cfg, const char *path, const char *flag)
{
	struct conf_origin o = { .layer = CONF_FLAG, .note = flag };

	if (check_lock(cfg, SET_MODULE, "module", &o) != 0)
		return -1;
	return config_add_module(cfg, path, NULL, NULL, &o);
}

/* ------------------------------------------------------------ --print-config */

static void
print_value(FILE *out, const char *key, const char *val, const struct conf_origin *o,
	    const struct agent_config *cfg, int s)
{
	char where[PATH_MAX + 64];

	config_origin_format(o, where, sizeof(where));
	fprintf(out, "%s %s\t# %s", key, val, where);
	if (s >= 0 && cfg->locked[s]) {
		char lw[PATH_MAX + 64];
		config_origin_format(&cfg->lock_origin[s], lw, sizeof(lw));
		fprintf(out, "; locked at %s", lw);
	}
	fputc('\n', out);
}

/* allow-programs: one line per path (lines add up), or a comment when not set. */
static void
print_programs(FILE *out, const struct conf_programs *pr, const struct agent_config *cfg)
{
	static const struct conf_origin dflt = { .layer = CONF_DEFAULT };

	if (!pr->set) {
		print_value(out, "# allow-programs", "not set: any program", &dflt, cfg,
			    SET_ALLOW_PROGRAMS);
		return;
	}
	for (size_t i = 0; i < pr->n; i++)
		print_value(out, "allow-programs", pr->paths[i], &pr->origin, cfg,
			    SET_ALLOW_PROGRAMS);
}

static const char *
file_state(int st)
{
	return st == CONF_FILE_READ ? "read" : st == CONF_FILE_MISSING ? "not present" : "not read";
}

void
config_print(const struct agent_config *cfg, FILE *out)
{
	char v[64];

	fprintf(out, "# p11agentd %s: effective configuration; after '#', where each value "
		"comes from\n", PACKAGE_VERSION);
	fprintf(out, "# administrator's file: %s (%s)\n", cfg->admin_file ? cfg->admin_file : "-",
		file_state(cfg->admin_state));
	fprintf(out, "# user's file: %s (%s)\n", cfg->user_file ? cfg->user_file : "-",
		file_state(cfg->user_state));
	print_value(out, "socket", cfg->socket_path ? cfg->socket_path : "(none)",
		    &cfg->origin[SET_SOCKET], cfg, SET_SOCKET);
	snprintf(v, sizeof(v), "%d", cfg->session_pool);
	print_value(out, "session-pool", v, &cfg->origin[SET_SESSION_POOL], cfg, SET_SESSION_POOL);
	snprintf(v, sizeof(v), "%d", cfg->sign_timeout_ms / 1000);
	print_value(out, "sign-timeout", v, &cfg->origin[SET_SIGN_TIMEOUT], cfg, SET_SIGN_TIMEOUT);
	snprintf(v, sizeof(v), "%d", cfg->max_connections);
	print_value(out, "max-connections", v, &cfg->origin[SET_MAX_CONNECTIONS], cfg,
		    SET_MAX_CONNECTIONS);
	snprintf(v, sizeof(v), "%d", cfg->max_channels_per_connection);
	print_value(out, "max-channels-per-connection", v,
		    &cfg->origin[SET_MAX_CHANNELS_PER_CONNECTION], cfg,
		    SET_MAX_CHANNELS_PER_CONNECTION);
	snprintf(v, sizeof(v), "%d", cfg->max_channels_per_process);
	print_value(out, "max-channels-per-process", v, &cfg->origin[SET_MAX_CHANNELS_PER_PROCESS],
		    cfg, SET_MAX_CHANNELS_PER_PROCESS);
	print_value(out, "debug", cfg->debug ? "yes" : "no", &cfg->origin[SET_DEBUG], cfg,
		    SET_DEBUG);
	config_format_duration(cfg->idle_lock_ms, v, sizeof(v));
	print_value(out, "idle-lock", v, &cfg->origin[SET_IDLE_LOCK], cfg, SET_IDLE_LOCK);
	config_format_duration(cfg->pin_ttl_ms, v, sizeof(v));
	print_value(out, "pin-ttl", v, &cfg->origin[SET_PIN_TTL], cfg, SET_PIN_TTL);
	print_value(out, "tls-only", cfg->tls_only ? "yes" : "no", &cfg->origin[SET_TLS_ONLY], cfg,
		    SET_TLS_ONLY);
	print_programs(out, &cfg->allow_programs, cfg);
	print_value(out, "forwarding", config_forwarding_name(cfg->forwarding),
		    &cfg->origin[SET_FORWARDING], cfg, SET_FORWARDING);
	print_value(out, "confirm", config_confirm_name(cfg->confirm), &cfg->origin[SET_CONFIRM],
		    cfg, SET_CONFIRM);
	print_value(out, "pinentry-program", cfg->pinentry_program ? cfg->pinentry_program :
		    PINENTRY_DEFAULT, &cfg->origin[SET_PINENTRY_PROGRAM], cfg, SET_PINENTRY_PROGRAM);
	print_value(out, "lock-on-suspend", cfg->lock_on_suspend ? "yes" : "no",
		    &cfg->origin[SET_LOCK_ON_SUSPEND], cfg, SET_LOCK_ON_SUSPEND);
	print_value(out, "lock-on-screen-lock", cfg->lock_on_screen_lock ? "yes" : "no",
		    &cfg->origin[SET_LOCK_ON_SCREEN_LOCK], cfg, SET_LOCK_ON_SCREEN_LOCK);
	print_value(out, "audit", audit_names[cfg->audit], &cfg->origin[SET_AUDIT], cfg, SET_AUDIT);
	snprintf(v, sizeof(v), "%d", cfg->audit_ring);
	print_value(out, "audit-ring", v, &cfg->origin[SET_AUDIT_RING], cfg, SET_AUDIT_RING);
	for (int s = 0; s < SET_COUNT; s++)
		if (cfg->locked[s])
			print_value(out, "lock", setting_names[s], &cfg->lock_origin[s], cfg, -1);
	for (size_t i = 0; i < cfg->nallow; i++)
		print_value(out, "module-allow", cfg->allow[i].text, &cfg->allow[i].origin, cfg, -1);
	for (size_t i = 0; i < cfg->nskip; i++)
		print_value(out, "module-skip", cfg->skip[i].text, &cfg->skip[i].origin, cfg,
			    SET_MODULE_SKIP);
	fprintf(out, "# modules: %s\n", cfg->modules_from_registry ?
		"those registered with p11-kit (no module line or --module)" :
		"named by module lines or --module");
	for (size_t i = 0; i < cfg->nmodules; i++)
		print_value(out, "module", cfg->modules[i].path, &cfg->modules[i].origin, cfg,
			    cfg->modules_from_registry ? -1 : SET_MODULE);
	for (size_t i = 0; i < cfg->nmodules; i++) {
		const struct module_conf *m = &cfg->modules[i];
		fprintf(out, "[module %s]\n", m->name);
		if (m->load_path && strcmp(m->load_path, m->path) != 0)
			fprintf(out, "# loaded as %s\n", m->load_path);
		if (m->init_args)
			print_value(out, "init-args", m->init_args, &m->init_origin, cfg, SET_MODULE);
		snprintf(v, sizeof(v), "%d", m->session_pool);
		print_value(out, "session-pool", v, &m->pool_origin, cfg, SET_SESSION_POOL);
		config_format_duration(m->idle_lock_ms, v, sizeof(v));
		print_value(out, "idle-lock", v, &m->idle_origin, cfg, SET_IDLE_LOCK);
		config_format_duration(m->pin_ttl_ms, v, sizeof(v));
		print_value(out, "pin-ttl", v, &m->ttl_origin, cfg, SET_PIN_TTL);
	}
	for (size_t i = 0; i < cfg->nkeysecs; i++) {
		const struct conf_keysec *ks = &cfg->keysecs[i];
		fprintf(out, "[key %s]\n", ks->pattern);
		if (ks->tls_only >= 0)
			print_value(out, "tls-only", ks->tls_only ? "yes" : "no", &ks->tls_origin, cfg,
				    SET_TLS_ONLY);
		if (ks->programs.set)
			print_programs(out, &ks->programs, cfg);
		if (ks->forwarding >= 0)
			print_value(out, "forwarding", config_forwarding_name(ks->forwarding),
				    &ks->fwd_origin, cfg, SET_FORWARDING);
		if (ks->confirm >= 0)
			print_value(out, "confirm", config_confirm_name(ks->confirm),
				    &ks->confirm_origin, cfg, SET_CONFIRM);
		if (ks->keep_context_pin >= 0)
			print_value(out, "keep-context-pin", ks->keep_context_pin ? "yes" : "no",
				    &ks->keep_origin, cfg, SET_KEEP_CONTEXT_PIN);
	}
	for (size_t i = 0; i < cfg->ndropped; i++) {
		char where[PATH_MAX + 64];
		const struct conf_dropped *d = &cfg->dropped[i];
		config_origin_format(&d->origin, where, sizeof(where));
		fprintf(out, "# not used: %s (%s, %s): %s\n", d->name, d->path, where, d->why);
	}
}
