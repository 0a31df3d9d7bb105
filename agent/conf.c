#include "config.h"
#include "conf.h"
#include "p11a.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void
config_init(struct agent_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->sign_timeout_ms = 30000;
	cfg->max_connections = 1024;
	cfg->max_channels_per_connection = 64;
	cfg->max_channels_per_process = 256;
}

void
config_free(struct agent_config *cfg)
{
	free(cfg->socket_path);
	for (size_t i = 0; i < cfg->nmodules; i++) {
		free(cfg->modules[i].path);
		free(cfg->modules[i].name);
		free(cfg->modules[i].init_args);
	}
	memset(cfg, 0, sizeof(*cfg));
}

int
config_add_module(struct agent_config *cfg, const char *path, const char *name,
		  const char *init_args)
{
	if (cfg->nmodules >= CONFIG_MAX_MODULES) {
		fprintf(stderr, "p11agentd: too many modules (at most %d)\n", CONFIG_MAX_MODULES);
		return -1;
	}
	if (path[0] != '/') {
		fprintf(stderr, "p11agentd: module path '%s' is not absolute\n", path);
		return -1;
	}
	struct module_conf *m = &cfg->modules[cfg->nmodules];
	const char *base = strrchr(path, '/');
	m->path = strdup(path);
	m->name = strdup(name ? name : (base ? base + 1 : path));
	m->init_args = init_args ? strdup(init_args) : NULL;
	if (!m->path || !m->name || (init_args && !m->init_args)) {
		free(m->path);
		free(m->name);
		free(m->init_args);
		memset(m, 0, sizeof(*m));
		fprintf(stderr, "p11agentd: out of memory\n");
		return -1;
	}
	cfg->nmodules++;
	return 0;
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

int
config_load_file(struct agent_config *cfg, const char *file)
{
	FILE *f = fopen(file, "re");
	if (!f) {
		fprintf(stderr, "p11agentd: %s: %s\n", file, strerror(errno));
		return -1;
	}
	char line[4096];
	int lineno = 0, rc = 0, secs;
	while (fgets(line, sizeof(line), f)) {
		lineno++;
		if (!strchr(line, '\n') && !feof(f)) {
			fprintf(stderr, "p11agentd: %s:%d: line too long\n", file, lineno);
			rc = -1;
			break;
		}
		char *hash = strchr(line, '#');
		if (hash)
			*hash = '\0';
		char *s = trim(line);
		if (!*s)
			continue;
		char *val = s;
		while (*val && !isspace((unsigned char)*val))
			val++;
		if (*val)
			*val++ = '\0';
		val = trim(val);
		if (!*val) {
			fprintf(stderr, "p11agentd: %s:%d: '%s' needs a value\n", file, lineno, s);
			rc = -1;
			break;
		}
		if (strcmp(s, "socket") == 0) {
			if (!cfg->socket_path && !(cfg->socket_path = strdup(val)))
				rc = -1;
		} else if (strcmp(s, "module") == 0) {
			if (config_add_module(cfg, val, NULL, NULL) != 0)
				rc = -1;
		} else if (strcmp(s, "module-init-args") == 0) {
			if (cfg->nmodules == 0) {
				fprintf(stderr, "p11agentd: %s:%d: module-init-args before any module\n",
					file, lineno);
				rc = -1;
			} else {
				struct module_conf *m = &cfg->modules[cfg->nmodules - 1];
				free(m->init_args);
				if (!(m->init_args = strdup(val)))
					rc = -1;
			}
		} else if (strcmp(s, "sign-timeout") == 0) {
			if (parse_int(val, 1, 3600, &secs) != 0) {
				fprintf(stderr, "p11agentd: %s:%d: sign-timeout must be 1..3600 seconds\n",
					file, lineno);
				rc = -1;
			} else {
				cfg->sign_timeout_ms = secs * 1000;
			}
		} else if (strcmp(s, "max-connections") == 0) {
			if (parse_int(val, 1, 65536, &cfg->max_connections) != 0) {
				fprintf(stderr, "p11agentd: %s:%d: max-connections must be 1..65536\n",
					file, lineno);
				rc = -1;
			}
		} else if (strcmp(s, "max-channels-per-connection") == 0) {
			if (parse_int(val, 1, 4096, &cfg->max_channels_per_connection) != 0) {
				fprintf(stderr, "p11agentd: %s:%d: max-channels-per-connection must be "
					"1..4096\n", file, lineno);
				rc = -1;
			}
		} else if (strcmp(s, "max-channels-per-process") == 0) {
			if (parse_int(val, 1, 4096, &cfg->max_channels_per_process) != 0) {
				fprintf(stderr, "p11agentd: %s:%d: max-channels-per-process must be "
					"1..4096\n", file, lineno);
				rc = -1;
			}
		} else if (strcmp(s, "debug") == 0) {
			if (strcmp(val, "yes") == 0)
				cfg->debug = 1;
			else if (strcmp(val, "no") != 0) {
				fprintf(stderr, "p11agentd: %s:%d: debug must be yes or no\n", file, lineno);
				rc = -1;
			}
		} else {
			fprintf(stderr, "p11agentd: %s:%d: unknown setting '%s'\n", file, lineno, s);
			rc = -1;
		}
		if (rc)
			break;
	}
	fclose(f);
	return rc;
}
