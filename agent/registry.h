/*
 * p11-kit's module registry, read without loading a module.
 *
 * p11_kit_modules_load() dlopen()s every registered module to list them,
 * which would run vendor code (library constructors) for modules the
 * administrator's module-allow list refuses.  This reader follows
 * pkcs11.conf(5) instead: the global pkcs11.conf (user-config none, merge,
 * only), module files NAME.module in the user's ~/.config/pkcs11/modules
 * (skipped for root and setuid programs, as p11-kit does), the
 * administrator's directory and the packages' directory, a user file
 * overriding the same name key by key; enable-in/disable-in against the
 * program name "p11agentd"; relative module paths in p11-kit's module
 * directory.  Differences: a malformed module file is skipped with a
 * warning (p11-kit then refuses the whole registry), and files not named
 * NAME.module are ignored.
 */
#ifndef AGENT_REGISTRY_H
#define AGENT_REGISTRY_H

#include <stddef.h>

struct registry_module {
	char *name;          /* file name without .module */
	char *file;          /* the file that named the module (or the first one read) */
	char *path;          /* absolute module path, or NULL (remote: or no module:) */
	char *init_args;     /* x-init-reserved, or NULL */
	int priority;
	int trust_policy;    /* trust-policy: yes */
	int remote;          /* remote: (p11-kit-client), not a local module */
	int disabled;        /* enable-in/disable-in exclude p11agentd */
};

/*
 * Fills *out with every registered module, highest priority first, then
 * by name (as p11-kit orders them).  Problems with single files are
 * logged and the file skipped.  0, or -1 when out of memory.
 */
int registry_read(struct registry_module **out, size_t *n);
void registry_free(struct registry_module *mods, size_t n);

#endif
