/*
 * The agent main process's state, shared by its three files (internal:
 * nothing outside agent/server.c, agent/supervise.c, agent/handlers.c and
 * their tests includes it):
 *
 * - server.c: the poll() loop alone, the listening socket, client
 *   connections (accept, read, write, close) and signals.
 * - supervise.c: token helpers: spawn (with the child's descriptor
 *   clean-up), their control sockets, the inventory they push, reaping
 *   without ever blocking the loop (SIGCHLD via the signalfd, a deadline
 *   after which SIGKILL goes out) and restart with back-off.
 * - handlers.c: requests (HELLO, STATUS, LIST, HEALTH, UNLOCK, LOCK,
 *   OPEN_CHANNEL, SIGN relayed for forwarded clients), the requests forwarded to helpers and waiting for
 *   their reply (pending), and the error reply.
 */
#ifndef AGENT_SERVER_INT_H
#define AGENT_SERVER_INT_H

#include <poll.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "conf.h"
#include "frame.h"
#include "logind.h"
#include "proto.h"

#define RESTART_DELAY_MIN_MS   500
#define RESTART_DELAY_MAX_MS   30000
#define HELPER_STABLE_MS       60000
/* How long a request that needs the inventory waits for starting helpers. */
#define HELPER_START_WAIT_MS   10000
/*
 * A helper whose control socket closed gets this long to exit by itself
 * before SIGKILL; meanwhile the loop keeps serving.
 */
#define HELPER_REAP_GRACE_MS   500
#define ACCEPT_PAUSE_MS        200     /* out of descriptors: how long accept() rests */

struct helper {
	struct module_conf *mod;
	pid_t pid;                 /* 0 = no process (reaped) */
	int fd;                    /* control socket, -1 = closed */
	struct p11a_frame_in in;
	struct p11a_frame_out out;
	int up;                    /* first inventory received */
	int dead_for_good;         /* module failed to initialize */
	struct p11a_list_reply inv;
	int64_t restart_at;        /* 0 = not scheduled */
	int64_t kill_at;           /* socket closed, not reaped: SIGKILL at this time; 0 = none */
	int killed;                /* SIGKILL sent to this run's process */
	char down_why[64];         /* why the socket closed, for the exit message */
	int64_t started_ms;
	int restart_delay_ms;
	unsigned starts;           /* times the helper was started */
	int init_error;            /* this run's helper reported why it could not start */
	char last_error[512];      /* the module's latest failure, for HEALTH; "" = none */
	time_t error_time;
};

struct client {
	int fd;
	uint64_t serial;           /* tells a reused slot apart */
	int hello_done;
	uint16_t version;          /* protocol version chosen at HELLO */
	int closing;               /* close once the out queue is empty */
	int waiting;               /* replies still expected from helpers */
	int wait_error;            /* first error code among them, 0 = none */
	char *wait_error_msg;
	uint32_t uid;
	pid_t pid;
	char *exe;                 /* /proc/PID/exe read at accept (allow-programs), NULL unknown */
	int forwarded;             /* FWD_*: the peer is ssh, or the client signs on this connection */
	uint64_t start_time;       /* the peer's start time (/proc/PID/stat), 0 unknown: with
				    * pid it names the process for confirm = once */
	struct p11a_frame_in in;
	struct p11a_frame_out out;
	int reply_fd;              /* descriptor for the awaited CHANNEL reply, or -1 */
	int has_parked;            /* a request waits for helpers to come up */
	struct p11a_msg parked;
};

/*
 * struct client.forwarded: how the agent knows a connection comes from
 * elsewhere.  FWD_SSH at accept (the peer's executable is ssh or sshd:
 * logged as forwarded); FWD_RELAY from the first SIGN on the main
 * connection (a client does that only when a CHANNEL came without a
 * descriptor: ssh or a relay in between, such as socat, that the agent
 * cannot see through).  Every relayed SIGN is a forwarded signature and
 * meets the key's forwarding setting; a FWD_RELAY connection gets no
 * more signing channels (CHANNEL without a descriptor).
 */
enum { FWD_NO = 0, FWD_SSH = 1, FWD_RELAY = 2 };

struct pending {
	uint32_t id;
	size_t client;             /* index */
	uint64_t serial;
	size_t helper;
	int64_t deadline;
	uint8_t type;              /* request forwarded */
	char *what;                /* for timeout messages */
	int channel_fd;            /* H_ADOPT: the client's end of the channel, or -1 */
	char *uri;                 /* UNLOCK, LOCK: the token's URI, for the audit event */
	uint64_t started_us;       /* when it was sent, for the audit event */
	uint64_t dialog;           /* not 0: sent for this dialog (prompt.c), not for a client */
};
/* pending.type P11A_MSG_H_SIGN: the helper answers SIGNATURE (relayed as is) or ERROR. */

struct dialog;                     /* prompt.c */
struct tok_prompt;                 /* prompt.c */
struct confirm_grant;              /* prompt.c */

struct server {
	const struct agent_config *cfg;
	int listen_fd;
	int sig_fd;
	int stop;
	uid_t uid;
	size_t nhelpers;
	struct helper *helpers;
	size_t nclients, cclients;
	struct client *clients;    /* slots; fd -1 = free */
	uint64_t next_serial;
	size_t npending, cpending;
	struct pending *pending;
	uint32_t next_id;
	size_t open_clients;
	size_t max_clients;        /* max-connections, within RLIMIT_NOFILE */
	size_t notified_up;        /* modules up in the last STATUS= sent to systemd */
	int64_t accept_paused_until;       /* out of descriptors: listen again at this time */
	/* The poll set; in the server so that a helper forked from the loop still reaches it. */
	struct pollfd *pfd;
	size_t cpfd;
	struct logind *logind;     /* logind's lock signals on the system bus, or NULL */
	/* prompt.c: PIN and confirm dialogs */
	int wake_rd, wake_wr;      /* a dialog thread ended (pipe), -1 when none */
	struct dialog *dialogs;    /* queued and running, oldest first; one runs at a time */
	size_t ndialogs, cdialogs;
	uint64_t next_dialog;
	struct tok_prompt *tprompt;        /* per token: back-off, last error */
	size_t ntprompt;
	struct confirm_grant *grants;      /* confirm = once: processes that said yes */
	size_t ngrants;
	char *env[16];             /* the session for pinentry, "NAME=value" */
	size_t nenv;
};

/* ---- server.c: client connections */

/* Queues m for client ci (fd_to_pass owned from here on) and writes what it can. */
void send_msg(struct server *s, size_t ci, const struct p11a_msg *m, int fd_to_pass);
void client_close(struct server *s, size_t ci);
/* Reads what the client sent; a whole request goes to client_request(). */
void client_readable(struct server *s, size_t ci);

/* ---- supervise.c: token helpers */

void helper_init(struct server *s, size_t hi, struct module_conf *mod);
void helper_spawn(struct server *s, size_t hi);
/* Queues an internal frame (fd_to_pass owned from here on); a failure is logged. */
void helper_send(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m, int fd_to_pass);
void helper_readable(struct server *s, size_t hi);
/*
 * The helper's control socket closed or failed: close it, drop its
 * inventory, fail its requests, and set the deadline after which it is
 * killed.  Never waits: the process is reaped by helpers_reap().
 */
void helper_disconnect(struct server *s, size_t hi, const char *why);
/* Reaps every exited child (SIGCHLD, or any loop pass); never blocks. */
void helpers_reap(struct server *s);
/*
 * Timers: SIGKILL for helpers past their grace, restarts that are due.
 * Returns the earliest time it needs to run again (or `next`).
 */
int64_t helpers_tick(struct server *s, int64_t now, int64_t next);
/* 1 while a helper was started less than HELPER_START_WAIT_MS ago and has not reported. */
int helpers_starting(const struct server *s, int64_t now);
/* Shutdown: EOF to every helper, then waits (bounded, SIGKILL after) for all to exit. */
void helpers_stop(struct server *s);
/* Frees what helper hi holds (socket, queues, inventory); no process handling. */
void helper_free(struct helper *h);

/* ---- prompt.c: PIN and confirm dialogs (pinentry.c runs them) */

/* Wake-up pipe, session environment from the agent's own; 0 or -1 (logged). */
int prompt_init(struct server *s);
void prompt_free(struct server *s);
void handle_unlock_prompt(struct server *s, size_t ci, const char *uri);
void handle_confirm(struct server *s, size_t ci, const char *uri);
void handle_context_pin(struct server *s, size_t ci, const char *uri);
void handle_update_env(struct server *s, size_t ci, const struct p11a_update_env *env);
/*
 * OPEN_CHANNEL of a key with confirm = once: 1 when client ci's process
 * has said yes for key_uri (the inventory's URI), else 0.
 */
int prompt_process_confirmed(const struct server *s, size_t ci, const char *key_uri);
/* The wake-up pipe was readable: finished dialogs, the next one started. */
void prompt_wake(struct server *s);
/* Waiters and dialogs past their deadline; returns the earliest deadline or next. */
int64_t prompt_tick(struct server *s, int64_t now, int64_t next);
/* The helper answered a request sent for dialog id (code 0 = OK). */
void prompt_helper_reply(struct server *s, uint64_t dialog, int code, const char *msg);

/* ---- handlers.c: requests */

/* A whole frame is in s->clients[ci].in: decode, check, dispatch. */
void client_request(struct server *s, size_t ci);
/* Dispatches a decoded request (taken over: *req is zeroed). */
void client_dispatch(struct server *s, size_t ci, struct p11a_msg *req);
/* Dispatches parked requests once no helper is still starting. */
void clients_unpark(struct server *s, int64_t now);
/* The one error reply: ERROR with code and formatted text, logged at debug. */
void send_error(struct server *s, size_t ci, int code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void send_ok(struct server *s, size_t ci);
/*
 * One awaited reply arrived (code 0 = OK) for client ci with that serial
 * (a closed or reused slot is left alone); the reply goes out once every
 * awaited one did.  Whoever makes a client wait raises its waiting count.
 */
void client_reply_arrived(struct server *s, size_t ci, uint64_t serial, int code,
			  const char *msg);
/*
 * A request to helper hi made by the agent itself for a dialog (not
 * waited for by a client): its reply goes to prompt_helper_reply().
 */
struct pending *pending_add_dialog(struct server *s, size_t hi, uint8_t type, const char *what,
				   uint64_t dialog);
/* Locks every token of every module; why names the cause in the log ("SIGHUP"). */
void tokens_lock_all(struct server *s, const char *why);
/* A helper's reply to request id (or an unsolicited message, id 0). */
void pending_reply(struct server *s, size_t hi, uint32_t id, const struct p11a_msg *m);
/* Every request waiting on helper hi gets a HELPER error. */
void pending_fail_helper(struct server *s, size_t hi);
/* Requests past their deadline get a TIMEOUT error. */
void pending_expire(struct server *s, int64_t now);
/* The earliest pending deadline, or next. */
int64_t pending_next_deadline(const struct server *s, int64_t next);
void pending_free_all(struct server *s);

/*
 * Tokens of every helper's inventory that match uri ("" = all), in
 * helper order; *out (NULL when none) is the caller's to free.  Returns
 * the count or a negative P11A_E_* (a bad URI, -P11A_E_NOMEM).
 */
struct token_ref {
	size_t helper;
	const struct p11a_token *token;
};
int find_tokens(const struct server *s, const char *uri, struct token_ref **out);

#endif
