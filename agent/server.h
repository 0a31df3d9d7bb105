/*
 * The agent's main process: listener, event loop, client connections
 * (server.c), token helper supervision and the inventory they report
 * (supervise.c), request handlers (handlers.c); see server_int.h.
 */
#ifndef AGENT_SERVER_H
#define AGENT_SERVER_H

#include "conf.h"

/*
 * Creates the socket directory (0700, owned by us) and listening socket
 * (0600) at cfg->socket_path, refusing to replace a socket where an agent
 * answers.  Returns the listening fd or -1 after printing why to stderr.
 */
int server_listen(const struct agent_config *cfg);

/* Runs until SIGTERM/SIGINT; removes the socket; returns the exit status. */
int server_run(const struct agent_config *cfg, int listen_fd);

#endif
