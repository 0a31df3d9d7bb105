/*
 * p11agent log: the agent's recent audit events (who signed, unlocked,
 * locked or was refused what), from the agent's in-memory ring.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "cli.h"
#include "tlsclass.h"

static const char log_usage[] =
	"Usage: p11agent log [--json] [--since DURATION|TIME] [-n COUNT]\n"
	"\n"
	"Shows the agent's recent audit events, oldest first: every signature\n"
	"(the program, its pid, the key, the scheme, what was signed: tls1.3,\n"
	"tls1.2, raw or digest), refusals by a key's policy, unlocks (never the\n"
	"PIN), locks with their reason, and PIN dialogs.  The agent keeps the\n"
	"latest events in memory (audit-ring in p11agentd.conf(5)), so this works\n"
	"without a journal.\n"
	"\n"
	"Options:\n"
	"  -j, --json          a JSON array of event objects\n"
	"  -S, --since WHEN    only events since WHEN: a duration back from now\n"
	"                      (30s, 10m, 2h, 1d), a local time ('2026-01-31 14:05',\n"
	"                      '2026-01-31T14:05:00', '14:05'), or @UNIXTIME\n"
	"  -n, --count N       only the newest N events\n"
	"  -h, --help          show this help\n";

/* The content names of common/tlsclass.h, by the wire's content byte. */
static const char *
content_name(uint8_t content)
{
	if (content == P11A_CONTENT_NONE || content > P11A_CONTENT_MAX)
		return NULL;
	return p11a_tlsclass_name((enum p11a_tlsclass)(content - 1));
}

static uint64_t
now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* "90", "90s", "10m", "2h", "1d": seconds back from now; -1 when it is not one. */
static int
parse_ago(const char *s, uint64_t *secs)
{
	char *end;
	unsigned long long v;
	uint64_t mult = 1;

	if (!isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0)
		return -1;
	if (*end != '\0') {
		if (end[1] != '\0')
			return -1;
		switch (*end) {
		case 's':
			mult = 1;
			break;
		case 'm':
			mult = 60;
			break;
		case 'h':
			mult = 3600;
			break;
		case 'd':
			mult = 86400;
			break;
		default:
			return -1;
		}
	}
	if (v > UINT64_MAX / mult / 1000000u)
		return -1;
	*secs = (uint64_t)v * mult;
	return 0;
}

/* WHEN of --since into microseconds since the epoch; -1 when it does not parse. */
static int
parse_since(const char *s, uint64_t *out)
{
	static const char *const fmts[] = { "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S",
					    "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d",
					    "%H:%M:%S", "%H:%M" };
	uint64_t secs, now = now_us();
	struct tm tm;
	time_t t;

	if (*s == '@') {
		char *end;
		unsigned long long v;

		errno = 0;
		v = strtoull(s + 1, &end, 10);
		if (errno != 0 || end == s + 1 || *end != '\0' || v > UINT64_MAX / 1000000u)
			return -1;
		*out = (uint64_t)v * 1000000u;
		return 0;
	}
	if (parse_ago(s, &secs) == 0) {
		*out = secs * 1000000u < now ? now - secs * 1000000u : 0;
		return 0;
	}
	for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
		const char *end;
		time_t today = time(NULL);

		memset(&tm, 0, sizeof(tm));
		if (fmts[i][1] == 'H') {
			/* A time of day is today's. */
			localtime_r(&today, &tm);
			tm.tm_sec = 0;
		}
		end = strptime(s, fmts[i], &tm);
		if (end == NULL || *end != '\0')
			continue;
		tm.tm_isdst = -1;
		if ((t = mktime(&tm)) == (time_t)-1 || t < 0)
			return -1;
		*out = (uint64_t)t * 1000000u;
		return 0;
	}
	return -1;
}

static const char *
basename_of(const char *path)
{
	const char *slash = path != NULL ? strrchr(path, '/') : NULL;

	return slash != NULL ? slash + 1 : path != NULL ? path : "";
}

static void
format_time(uint64_t us, int utc_iso, char *out, size_t size)
{
	time_t t = (time_t)(us / 1000000u);
	struct tm tm;
	char base[48];

	if (utc_iso) {
		gmtime_r(&t, &tm);
		strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
		snprintf(out, size, "%s.%06" PRIu64 "Z", base, us % 1000000u);
	} else {
		localtime_r(&t, &tm);
		strftime(base, sizeof(base), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(out, size, "%s.%03" PRIu64, base, (us % 1000000u) / 1000u);
	}
}

static void
print_human(const struct p11a_event *e)
{
	const char *kind = p11a_event_kind_name(e->kind);
	const char *scheme = e->scheme ? p11a_scheme_name(e->scheme) : NULL;
	const char *content = content_name(e->content);
	char when[64], prog[300], what[64] = "", dur[32] = "";

	format_time(e->time_us, 0, when, sizeof(when));
	if (e->kind == P11A_EV_DROPPED) {
		printf("%s  %u events dropped (the token helper's queue was full)\n", when,
		       (unsigned)e->count);
		return;
	}
	if (e->pid != 0)
		snprintf(prog, sizeof(prog), "%s[%" PRIu32 "]",
			 e->exe && *e->exe ? basename_of(e->exe) : "?", e->pid);
	else
		snprintf(prog, sizeof(prog), "p11agentd");
	if (scheme != NULL || content != NULL)
		snprintf(what, sizeof(what), "%s%s%s", scheme ? scheme : "",
			 scheme && content ? " " : "", content ? content : "");
	if (e->duration_us != 0)
		snprintf(dur, sizeof(dur), "%" PRIu64 " us", e->duration_us);
	printf("%s  %-20s %-10s %s%s%s%s%s  %s%s%s%s%s%s\n", when, prog, kind ? kind : "?",
	       e->uri && *e->uri ? e->uri : "every token",
	       *what ? "  " : "", what,
	       e->reason && *e->reason ? "  reason " : "", e->reason ? e->reason : "",
	       e->result == 0 ? "ok" : p11a_errname((int)e->result),
	       e->result != 0 && e->message && *e->message ? ": " : "",
	       e->result != 0 && e->message ? e->message : "",
	       *dur ? "  (" : "", dur, *dur ? ")" : "");
}

/*
 * JSON text is UTF-8: a path or URI that is not (a file name can be any
 * bytes) has each byte of 0x80 and above shown as '?'.
 */
static void
jadd_str(struct json_object *o, const char *k, const char *v)
{
	char *copy = NULL;

	if (v != NULL && !p11a_utf8_valid(v) && (copy = strdup(v)) != NULL) {
		for (char *p = copy; *p; p++)
			if ((unsigned char)*p >= 0x80)
				*p = '?';
		v = copy;
	}
	json_object_object_add(o, k, v != NULL ? json_object_new_string(v) : NULL);
	free(copy);
}

static struct json_object *
event_json(const struct p11a_event *e)
{
	struct json_object *o = json_object_new_object();
	char when[64];

	if (o == NULL)
		return NULL;
	format_time(e->time_us, 1, when, sizeof(when));
	jadd_str(o, "time", when);
	json_object_object_add(o, "time_us", json_object_new_int64((int64_t)e->time_us));
	jadd_str(o, "event", p11a_event_kind_name(e->kind));
	jadd_str(o, "uri", e->uri);
	jadd_str(o, "scheme", e->scheme ? p11a_scheme_name(e->scheme) : NULL);
	jadd_str(o, "content", content_name(e->content));
	json_object_object_add(o, "pid", e->pid ? json_object_new_int64(e->pid) : NULL);
	json_object_object_add(o, "uid", json_object_new_int64(e->uid));
	jadd_str(o, "exe", e->exe && *e->exe ? e->exe : NULL);
	jadd_str(o, "program", e->exe && *e->exe ? basename_of(e->exe) : NULL);
	json_object_object_add(o, "forwarded",
			       json_object_new_boolean(!!(e->flags & P11A_EVENT_FORWARDED)));
	jadd_str(o, "result", e->result == 0 ? "ok" : p11a_errname((int)e->result));
	jadd_str(o, "error", e->result != 0 ? e->message : NULL);
	json_object_object_add(o, "duration_us", json_object_new_int64((int64_t)e->duration_us));
	jadd_str(o, "reason", e->reason && *e->reason ? e->reason : NULL);
	if (e->kind == P11A_EV_DROPPED)
		json_object_object_add(o, "dropped", json_object_new_int64(e->count));
	return o;
}

int
cmd_log(struct cli_ctx *ctx, int argc, char **argv)
{
	static const struct option opts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "since", required_argument, NULL, 'S' },
		{ "count", required_argument, NULL, 'n' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct p11a_client *c = NULL;
	struct p11a_msg reply;
	uint64_t since = 0;
	unsigned long count = 0;
	int ch, r, rc, json = 0;

	memset(&reply, 0, sizeof(reply));
	while ((ch = getopt_long(argc, argv, "jS:n:h", opts, NULL)) != -1) {
		switch (ch) {
		case 'j':
			json = 1;
			break;
		case 'S':
			if (parse_since(optarg, &since) != 0)
				return cli_usage_err("log", "--since: '%s' is neither a duration (10m, "
						     "2h, 1d) nor a time ('2026-01-31 14:05', "
						     "@UNIXTIME)", optarg);
			break;
		case 'n': {
			char *end;

			errno = 0;
			count = strtoul(optarg, &end, 10);
			if (!isdigit((unsigned char)*optarg) || errno != 0 || *end != '\0' ||
			    count == 0 || count > UINT32_MAX)
				return cli_usage_err("log", "--count: '%s' is not a positive number",
						     optarg);
			break;
		}
		case 'h':
			fputs(log_usage, stdout);
			return cli_finish_stdout(CLI_EXIT_OK);
		default:
			return cli_try_help("log");
		}
	}
	if (optind < argc)
		return cli_usage_err("log", "unexpected argument '%s'", argv[optind]);

	rc = cli_connect(ctx, &c);
	if (rc != CLI_EXIT_OK)
		return rc;
	r = p11a_client_log(c, since, (uint32_t)count, &reply);
	if (r != 0) {
		rc = cli_fail(c, r, "log");
		goto out;
	}
	if (json) {
		struct json_object *arr = json_object_new_array();
		const char *text;

		if (arr == NULL) {
			cli_err("log: out of memory");
			rc = CLI_EXIT_FAIL;
			goto out;
		}
		for (uint32_t i = 0; i < reply.u.events.n; i++) {
			struct json_object *o = event_json(&reply.u.events.ev[i]);
			if (o == NULL || json_object_array_add(arr, o) != 0) {
				json_object_put(o);
				json_object_put(arr);
				cli_err("log: out of memory");
				rc = CLI_EXIT_FAIL;
				goto out;
			}
		}
		/* json-c escapes control characters: nothing raw reaches the terminal. */
		text = json_object_to_json_string_ext(arr, JSON_C_TO_STRING_PLAIN |
						      JSON_C_TO_STRING_NOSLASHESCAPE);
		puts(text != NULL ? text : "[]");
		json_object_put(arr);
	} else {
		for (uint32_t i = 0; i < reply.u.events.n; i++) {
			struct p11a_event *e = &reply.u.events.ev[i];
			p11a_text_scrub(e->uri);
			p11a_text_scrub(e->exe);
			p11a_text_scrub(e->message);
			p11a_text_scrub(e->reason);
			print_human(e);
		}
	}
	rc = cli_finish_stdout(CLI_EXIT_OK);
out:
	p11a_msg_clear(&reply);
	p11a_client_free(c);
	return rc;
}
