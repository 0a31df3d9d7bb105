/*
 * Discovery of the PKCS#11 modules registered with p11-kit.
 *
 * Loading a module runs vendor code, so discovery happens in a throwaway
 * child process that reports paths back over a pipe; the agent's main
 * process never loads a module.  Skips trust-only modules (p11-kit-trust,
 * "trust-policy: yes"), disabled ones, and p11agent's own front-end
 * module (p11agent-pkcs11.so), which would loop.
 */
#ifndef AGENT_MODULES_H
#define AGENT_MODULES_H

#include "conf.h"

/* Appends the registered modules to cfg; returns how many, or -1. */
int modules_discover(struct agent_config *cfg);
/* 1 if path names a module the agent must never load (its own front end). */
int modules_is_forbidden(const char *path);

#endif
