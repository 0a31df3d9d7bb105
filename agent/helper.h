/*
 * Token helper: the only process that calls PKCS#11.  The agent forks one
 * per module (see docs/architecture.md) and talks to it over a socketpair
 * with internal frames (docs/protocol.md, "Internal frames").
 *
 * Contract with the main process:
 * - On start the helper loads the module (dlopen), calls C_Initialize once
 *   with CKF_OS_LOCKING_OK (pReserved = mod->init_args), enumerates, and
 *   sends H_INVENTORY with id 0: that marks it up.  It sends H_INVENTORY
 *   id 0 again whenever tokens or login states change; after UNLOCK and
 *   LOCK it sends it before the reply, so the agent lists the new state
 *   by the time it answers its client.
 * - Requests UNLOCK, LOCK, H_REFRESH, H_ADOPT (descriptor attached) carry
 *   an id; each gets exactly one reply with that id (OK, ERROR,
 *   H_INVENTORY for H_REFRESH; OK for H_ADOPT once the channel is served).
 * - Each adopted channel is served by its own thread: SIGN in, SIGNATURE
 *   or ERROR out, one at a time; EOF or a malformed frame ends the channel.
 * - EOF on ctrl_fd (agent gone) ends the helper.
 * - Exit status: 0 after EOF, HELPER_EXIT_INIT when the module cannot be
 *   loaded or initialized (the agent then does not restart it).
 */
#ifndef AGENT_HELPER_H
#define AGENT_HELPER_H

#include "conf.h"

#define HELPER_EXIT_INIT 3

/* Runs in the forked child; never returns to the agent's code paths. */
int helper_main(const struct module_conf *mod, int ctrl_fd, const struct agent_config *cfg);

#endif
