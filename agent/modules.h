/*
 * Which PKCS#11 modules the agent uses, decided before anything is loaded.
 *
 * modules_resolve() takes the module lines and --module flags in cfg, or,
 * when there are none, the modules registered with p11-kit
 * (agent/registry.c, which loads nothing), and for each:
 *   - drops it when a module-skip line names it (p11-kit name, file name
 *     or path);
 *   - refuses p11agent's own front-end module (p11agent-pkcs11.so), which
 *     would make the agent call itself;
 *   - resolves its real path (symbolic links followed) and, when the
 *     administrator's file has module-allow lines, checks that path
 *     against them: the helper later dlopen()s exactly that checked path;
 *   - applies the [module] sections (init-args, session-pool) and the
 *     global session-pool.
 * A module that was named (a module line or --module) and fails a check
 * is an error naming that line or flag; a registered module that fails
 * one is left out, with the reason kept in cfg->dropped and logged.
 */
#ifndef AGENT_MODULES_H
#define AGENT_MODULES_H

#include "conf.h"

/* 0, or -1 after printing "p11agentd: WHERE: reason" to stderr. */
int modules_resolve(struct agent_config *cfg);

/* 1 if path names a module the agent must never load (its own front end). */
int modules_is_forbidden(const char *path);

/*
 * 1 if real (a real path) matches a module-allow pattern: a path naming the
 * same file, or a glob that matches real or lists a link to it.
 */
int modules_allow_match(const char *pattern, const char *real);

#endif
