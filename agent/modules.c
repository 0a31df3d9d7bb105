/* Which modules the agent uses: registry or named, skips, the allow-list, per-module settings. */
#include "config.h"
#include "modules.h"
#include "registry.h"
#include "log.h"

#include <errno.h>
#include <fnmatch.h>
#include <glob.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int
modules_is_forbidden(const char *path)
{
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	return strncmp(base, "p11agent-pkcs11", 15) == 0;
}

int
modules_allow_match(const char *pattern, const char *real)
{
	char buf[PATH_MAX];
	glob_t g;
	int match = 0;

	if (!strpbrk(pattern, "*?[")) {
		/* A path: the same file, whatever links lead to it. */
		return strcmp(pattern, real) == 0 ||
		    (realpath(pattern, buf) && strcmp(buf, real) == 0);
	}
	if (fnmatch(pattern, real, FNM_PATHNAME) == 0)
		return 1;
	/*
	 * A file the pattern lists may be a link (libsofthsm2.so in
	 * /usr/lib/softhsm on Debian), or a directory on the way may be
	 * (/lib -> /usr/lib on merged-/usr systems): compare the real paths
	 * of what the pattern lists.
	 */
	if (glob(pattern, GLOB_NOSORT | GLOB_NOESCAPE, NULL, &g) != 0)
		return 0;
	for (size_t i = 0; i < g.gl_pathc && !match; i++)
		match = realpath(g.gl_pathv[i], buf) && strcmp(buf, real) == 0;
	globfree(&g);
	return match;
}

/* what (module-skip or a [module] section) names m: a path (same file), a p11-kit name or a file name. */
static int
names_module(const char *what, const struct module_conf *m, const char *real)
{
	char rw[PATH_MAX];

	if (what[0] == '/')
		return strcmp(what, m->path) == 0 ||
		    (real && realpath(what, rw) && strcmp(rw, real) == 0);
	return strcmp(what, m->name) == 0 || strcmp(what, strrchr(m->path, '/') + 1) == 0;
}

static void
module_remove(struct agent_config *cfg, size_t i)
{
	struct module_conf *m = &cfg->modules[i];

	free(m->path);
	free(m->load_path);
	free(m->name);
	free(m->init_args);
	memmove(m, m + 1, (cfg->nmodules - i - 1) * sizeof(*m));
	cfg->nmodules--;
	memset(&cfg->modules[cfg->nmodules], 0, sizeof(*m));
}

static int
discover(struct agent_config *cfg)
{
	struct registry_module *r;
	size_t n;

	if (registry_read(&r, &n) != 0)
		return -1;
	for (size_t i = 0; i < n; i++) {
		struct conf_origin o = { .layer = CONF_REGISTRY };
		const char *why = NULL;

		if (!(o.file = config_intern(cfg, r[i].file ? r[i].file : "")))
			goto nomem;
		if (r[i].remote)
			why = "a remote: module (p11-kit-client), not a local module";
		else if (!r[i].path)
			why = "its file has no module: line";
		else if (r[i].trust_policy || strcmp(strrchr(r[i].path, '/') + 1, "p11-kit-trust.so") == 0)
			why = "a trust-policy module (certificates only)";
		else if (r[i].disabled)
			why = "disabled for p11agentd by enable-in/disable-in";
		else if (modules_is_forbidden(r[i].path))
			why = "p11agent's own front end";
		if (why) {
			log_debug("not using registered module %s: %s", r[i].name, why);
			if (config_add_dropped(cfg, r[i].name, r[i].path, why, &o) != 0)
				goto nomem;
			continue;
		}
		if (cfg->nmodules == CONFIG_MAX_MODULES) {
			log_warn("more than %d registered modules; not using %s", CONFIG_MAX_MODULES,
				 r[i].name);
			if (config_add_dropped(cfg, r[i].name, r[i].path, "too many modules", &o) != 0)
				goto nomem;
			continue;
		}
		if (config_add_module(cfg, r[i].path, r[i].name, r[i].init_args, &o) != 0)
			goto fail;
	}
	registry_free(r, n);
	return 0;
nomem:
	fprintf(stderr, "p11agentd: out of memory\n");
fail:
	registry_free(r, n);
	return -1;
}

/* A named module failed a check: the error names its line or flag.  A registered one is left out. */
static int
refuse(struct agent_config *cfg, size_t *i, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int
refuse(struct agent_config *cfg, size_t *i, const char *fmt, ...)
{
	struct module_conf *m = &cfg->modules[*i];
	char why[1024], where[PATH_MAX + 64];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	config_origin_format(&m->origin, where, sizeof(where));
	if (m->origin.layer != CONF_REGISTRY) {
		fprintf(stderr, "p11agentd: %s: module %s: %s\n", where, m->path, why);
		return -1;
	}
	log_warn("not using registered module %s (%s): %s", m->name, where, why);
	if (config_add_dropped(cfg, m->name, m->path, why, &m->origin) != 0) {
		fprintf(stderr, "p11agentd: out of memory\n");
		return -1;
	}
	module_remove(cfg, *i);
	return 1;
}

static int
allowed(const struct agent_config *cfg, const char *real)
{
	for (size_t i = 0; i < cfg->nallow; i++)
		if (modules_allow_match(cfg->allow[i].text, real))
			return 1;
	return 0;
}

/* Layers in the order they override each other; a registry value is a default. */
static int
rank(enum conf_layer l)
{
	return l == CONF_REGISTRY ? CONF_DEFAULT : (int)l;
}

/*
 * A later layer wins over an earlier one, global setting or section alike;
 * within a layer a section wins over the global setting, and of two
 * sections the later.
 */
static int
apply_sections(struct agent_config *cfg, struct module_conf *m)
{
	m->session_pool = cfg->session_pool;
	m->pool_origin = cfg->origin[SET_SESSION_POOL];
	m->idle_lock_ms = cfg->idle_lock_ms;
	m->idle_origin = cfg->origin[SET_IDLE_LOCK];
	m->pin_ttl_ms = cfg->pin_ttl_ms;
	m->ttl_origin = cfg->origin[SET_PIN_TTL];
	for (size_t k = 0; k < cfg->nsections; k++) {
		const struct conf_section *sec = &cfg->sections[k];
		if (!names_module(sec->match, m, m->load_path))
			continue;
		if (sec->init_args && rank(sec->init_origin.layer) >= rank(m->init_origin.layer)) {
			free(m->init_args);
			if (!(m->init_args = strdup(sec->init_args)))
				return -1;
			m->init_origin = sec->init_origin;
		}
		if (sec->session_pool && rank(sec->pool_origin.layer) >= rank(m->pool_origin.layer)) {
			m->session_pool = sec->session_pool;
			m->pool_origin = sec->pool_origin;
		}
		if (sec->has_idle_lock && rank(sec->idle_origin.layer) >= rank(m->idle_origin.layer)) {
			m->idle_lock_ms = sec->idle_lock_ms;
			m->idle_origin = sec->idle_origin;
		}
		if (sec->has_pin_ttl && rank(sec->ttl_origin.layer) >= rank(m->ttl_origin.layer)) {
			m->pin_ttl_ms = sec->pin_ttl_ms;
			m->ttl_origin = sec->ttl_origin;
		}
	}
	return 0;
}

int
modules_resolve(struct agent_config *cfg)
{
	if (cfg->nmodules == 0) {
		cfg->modules_from_registry = 1;
		if (discover(cfg) != 0)
			return -1;
	}
	for (size_t i = 0; i < cfg->nmodules;) {
		struct module_conf *m = &cfg->modules[i];
		char real[PATH_MAX], where[PATH_MAX + 64];
		int have_real = realpath(m->path, real) != NULL;
		int r = 0, err = errno;
		size_t k;

		for (k = 0; k < cfg->nskip; k++)
			if (names_module(cfg->skip[k].text, m, have_real ? real : NULL))
				break;
		if (k < cfg->nskip) {
			config_origin_format(&cfg->skip[k].origin, where, sizeof(where));
			char why[PATH_MAX + 96];
			snprintf(why, sizeof(why), "skipped by module-skip %s (%s)", cfg->skip[k].text,
				 where);
			log_info("not using module %s: %s", m->name, why);
			if (config_add_dropped(cfg, m->name, m->path, why, &m->origin) != 0) {
				fprintf(stderr, "p11agentd: out of memory\n");
				return -1;
			}
			module_remove(cfg, i);
			continue;
		}
		if (modules_is_forbidden(m->path) || (have_real && modules_is_forbidden(real)))
			r = refuse(cfg, &i, "it is p11agent's own front end and would make the agent "
				   "call itself");
		else if (!have_real)
			r = refuse(cfg, &i, "%s", strerror(err));
		else if (cfg->nallow && !allowed(cfg, real))
			r = refuse(cfg, &i, "not allowed by the administrator: its real path %s "
				   "matches no module-allow line of %s", real, cfg->admin_file);
		else if (access(real, R_OK) != 0)
			r = refuse(cfg, &i, "%s", strerror(errno));
		if (r < 0)
			return -1;
		if (r > 0)
			continue;
		if (!(m->load_path = strdup(real)) || apply_sections(cfg, m) != 0) {
			fprintf(stderr, "p11agentd: out of memory\n");
			return -1;
		}
		i++;
	}
	return 0;
}
