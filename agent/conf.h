/*
 * Agent configuration: command line and an optional config file.
 *
 * Config file syntax: one "key value" per line, '#' comments.
 *   socket PATH
 *   module PATH            (repeatable; replaces the p11-kit registry)
 *   module-init-args TEXT  (for the preceding module: CK_C_INITIALIZE_ARGS.pReserved)
 *   sign-timeout SECONDS   (per-request deadline, default 30)
 *   max-connections N      (default 1024)
 *   max-channels-per-connection N  (signing channels one connection may hold per module, default 64)
 *   max-channels-per-process N     (the same per client process, default 256)
 *   debug yes|no
 * Command-line options override the file.
 */
#ifndef AGENT_CONF_H
#define AGENT_CONF_H

#include <stddef.h>

#define CONFIG_MAX_MODULES 32

struct module_conf {
	char *path;          /* absolute path of the PKCS#11 module */
	char *name;          /* short name for logs (p11-kit name or basename) */
	char *init_args;     /* pReserved string for C_Initialize, or NULL */
};

struct agent_config {
	char *socket_path;
	int foreground;
	int debug;
	int sign_timeout_ms;
	int max_connections;
	int max_channels_per_connection;
	int max_channels_per_process;
	size_t nmodules;
	struct module_conf modules[CONFIG_MAX_MODULES];
	int modules_from_registry;  /* no module given: use p11-kit's registry */
};

void config_init(struct agent_config *cfg);
/* Reads FILE; returns 0 or -1 after printing "p11agentd: FILE:LINE: why" to stderr. */
int config_load_file(struct agent_config *cfg, const char *file);
/* Adds a module (path copied); -1 with a message when full or not absolute. */
int config_add_module(struct agent_config *cfg, const char *path, const char *name, const char *init_args);
void config_free(struct agent_config *cfg);

#endif
