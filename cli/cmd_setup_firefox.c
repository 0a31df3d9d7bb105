/*
 * p11agent setup firefox-policy: the SecurityDevices enterprise policy
 * that makes Firefox load p11agent-pkcs11.so.
 *
 * Without --system or --file it prints a policies.json fragment.  With
 * them it merges the module into an existing policies.json (every other
 * policy and device is kept), or removes it with --remove, and replaces
 * the file atomically.  A file that is not valid JSON is refused, named
 * with its line, and left as it was.  json-c does the parsing and
 * printing.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

/* Policy files must stay small; Firefox reads them at every start. */
#define POLICY_MAX (1024 * 1024)

/*
 * Where Firefox reads the system's policies.json: SysConfD/policies.
 * Mozilla's builds and Debian's firefox-esr alike look in /etc/firefox
 * (strace of firefox-esr 128 on Debian 12: access("/etc/firefox/policies/
 * policies.json"), then its distribution directory).
 */
#define FF_SYSTEM_POLICY "/etc/firefox/policies/policies.json"

/* Reads path into a NUL-terminated buffer; *text NULL when it does not exist. */
static int
read_policy(const char *path, char **text)
{
	struct stat st;
	char *b;
	ssize_t n;
	size_t len = 0;
	int fd;

	*text = NULL;
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		if (errno == ENOENT)
			return 0;
		cli_err("cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > POLICY_MAX) {
		cli_err("%s: %s", path, !S_ISREG(st.st_mode) ? "not a regular file" :
			"larger than 1 MiB; not a policies.json");
		close(fd);
		return -1;
	}
	if ((b = malloc((size_t)st.st_size + 1)) == NULL) {
		close(fd);
		cli_err("out of memory");
		return -1;
	}
	while (len < (size_t)st.st_size &&
	       ((n = read(fd, b + len, (size_t)st.st_size - len)) > 0 || (n < 0 && errno == EINTR)))
		if (n > 0)
			len += (size_t)n;
	close(fd);
	b[len] = '\0';
	*text = b;
	return 0;
}

/* Parses text as one JSON object; names path:line on error. */
static json_object *
parse_policy(const char *path, const char *text)
{
	json_tokener *tok = json_tokener_new();
	json_object *o;
	size_t len = strlen(text), end, line = 1, i;
	enum json_tokener_error jerr;

	if (tok == NULL) {
		cli_err("out of memory");
		return NULL;
	}
	o = json_tokener_parse_ex(tok, text, (int)len);
	jerr = json_tokener_get_error(tok);
	end = json_tokener_get_parse_end(tok);
	if (o != NULL && jerr == json_tokener_success)
		while (end < len && strchr(" \t\r\n", text[end]) != NULL)
			end++;
	if (o == NULL || jerr != json_tokener_success || end != len) {
		const char *why = o == NULL && jerr == json_tokener_continue ? "unexpected end of file" :
			o == NULL ? json_tokener_error_desc(jerr) : "text after the JSON object";

		for (i = 0; i < end && i < len; i++)
			if (text[i] == '\n')
				line++;
		cli_err("%s:%zu: not valid JSON (%s); nothing changed", path, line, why);
		json_object_put(o);
		o = NULL;
	} else if (!json_object_is_type(o, json_type_object)) {
		cli_err("%s:1: not a JSON object; nothing changed", path);
		json_object_put(o);
		o = NULL;
	}
	json_tokener_free(tok);
	return o;
}

/* The object under key in parent, made when absent; NULL when key holds something else. */
static json_object *
child_object(const char *path, json_object *parent, const char *key)
{
	json_object *c;

	if (json_object_object_get_ex(parent, key, &c)) {
		if (json_object_is_type(c, json_type_object))
			return c;
		cli_err("%s: \"%s\" is not a JSON object; nothing changed", path, key);
		return NULL;
	}
	if ((c = json_object_new_object()) == NULL || json_object_object_add(parent, key, c) != 0) {
		cli_err("out of memory");
		return NULL;
	}
	return c;
}

/*
 * Sets (or removes) name in policies.SecurityDevices.  Firefox takes two
 * forms: {"Add": {NAME: PATH}, "Delete": [NAME]} and the older flat
 * {NAME: PATH}; an existing flat map stays flat.  *changed says whether
 * the document differs.
 */
static int
merge_device(const char *path, json_object *doc, const char *name, const char *mod,
	     int remove, int *changed)
{
	json_object *pol, *dev, *add = NULL, *del, *cur;
	int flat;

	*changed = 0;
	if ((pol = child_object(path, doc, "policies")) == NULL ||
	    (dev = child_object(path, pol, "SecurityDevices")) == NULL)
		return -1;
	flat = json_object_object_length(dev) > 0 &&
	       !json_object_object_get_ex(dev, "Add", NULL) &&
	       !json_object_object_get_ex(dev, "Delete", NULL);
	if (!flat && (add = child_object(path, dev, "Add")) == NULL)
		return -1;
	if (flat)
		add = dev;
	if (remove) {
		if (json_object_object_get_ex(add, name, NULL)) {
			json_object_object_del(add, name);
			*changed = 1;
		}
		if (!flat && json_object_object_length(add) == 0)
			json_object_object_del(dev, "Add");
		if (json_object_object_length(dev) == 0)
			json_object_object_del(pol, "SecurityDevices");
		return 0;
	}
	/* A Delete entry of the same name would unload what Add loads. */
	if (!flat && json_object_object_get_ex(dev, "Delete", &del) &&
	    json_object_is_type(del, json_type_array)) {
		size_t i = json_object_array_length(del);

		while (i-- > 0) {
			json_object *e = json_object_array_get_idx(del, i);

			if (json_object_is_type(e, json_type_string) &&
			    strcmp(json_object_get_string(e), name) == 0) {
				json_object_array_del_idx(del, i, 1);
				*changed = 1;
			}
		}
	}
	if (json_object_object_get_ex(add, name, &cur) && json_object_is_type(cur, json_type_string) &&
	    strcmp(json_object_get_string(cur), mod) == 0)
		return 0;
	if ((cur = json_object_new_string(mod)) == NULL || json_object_object_add(add, name, cur) != 0) {
		cli_err("out of memory");
		return -1;
	}
	*changed = 1;
	return 0;
}

/* mkdir -p for the policy file's directory (0755 each). */
static int
make_parents(const char *path)
{
	char dir[4096];
	char *p;

	if (snprintf(dir, sizeof(dir), "%s", path) >= (int)sizeof(dir))
		return -1;
	if ((p = strrchr(dir, '/')) == NULL || p == dir)
		return 0;
	*p = '\0';
	for (p = dir + 1; *p != '\0'; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(dir, 0755) != 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	return mkdir(dir, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

/* Replaces path with text atomically, keeping an existing file's mode. */
static int
replace_file(const char *path, const char *text)
{
	char tmp[4096];
	struct stat st;
	mode_t mode = 0644;
	size_t len = strlen(text), off = 0;
	ssize_t n;
	int fd, saved;

	if (stat(path, &st) == 0)
		mode = st.st_mode & 07777;
	if (make_parents(path) != 0 ||
	    snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp) ||
	    (fd = mkstemp(tmp)) < 0)
		return -1;
	if (fchmod(fd, mode) != 0)
		goto fail;
	while (off < len) {
		if ((n = write(fd, text + off, len - off)) < 0) {
			if (errno == EINTR)
				continue;
			goto fail;
		}
		off += (size_t)n;
	}
	if (fsync(fd) != 0 || close(fd) != 0) {
		fd = -1;
		goto fail;
	}
	fd = -1;
	if (rename(tmp, path) != 0)
		goto fail;
	return 0;
 fail:
	saved = errno;
	if (fd >= 0)
		close(fd);
	unlink(tmp);
	errno = saved;
	return -1;
}

/* Merges into one file; prints what it did. */
static int
update_one(const char *path, const char *name, const char *mod, int remove, int dry_run)
{
	json_object *doc = NULL;
	char *old = NULL;
	const char *out;
	int changed, rc = CLI_EXIT_FAIL;

	if (read_policy(path, &old) != 0)
		return CLI_EXIT_FAIL;
	if (old == NULL && remove) {
		printf("%s does not exist: nothing to remove.\n", path);
		return CLI_EXIT_OK;
	}
	doc = old != NULL ? parse_policy(path, old) : json_object_new_object();
	if (doc == NULL || merge_device(path, doc, name, mod, remove, &changed) != 0)
		goto out;
	if (!changed) {
		printf("%s already %s SecurityDevices '%s'%s%s: nothing changed.\n", path,
		       remove ? "lacks" : "has", name, remove ? "" : " = ", remove ? "" : mod);
		rc = CLI_EXIT_OK;
		goto out;
	}
	out = json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
					     JSON_C_TO_STRING_NOSLASHESCAPE);
	if (dry_run) {
		printf("# p11agent setup firefox-policy would write %s (nothing changed):\n%s\n",
		       path, out);
		rc = CLI_EXIT_OK;
		goto out;
	}
	{
		size_t olen = strlen(out);
		char *text = malloc(olen + 2);

		if (text == NULL) {
			cli_err("out of memory");
			goto out;
		}
		memcpy(text, out, olen);
		memcpy(text + olen, "\n", 2);
		if (replace_file(path, text) != 0) {
			cli_err("cannot write %s: %s; it is unchanged", path, strerror(errno));
			free(text);
			goto out;
		}
		free(text);
	}
	if (remove)
		printf("Removed SecurityDevices '%s' from %s.\n", name, path);
	else
		printf("Wrote %s: Firefox loads %s as security device '%s' at its next start.\n",
		       path, mod, name);
	rc = CLI_EXIT_OK;
 out:
	json_object_put(doc);
	free(old);
	return rc;
}

int
cli_setup_firefox(const char *name, const char *mod, const char *file, int system, int remove,
		  int dry_run)
{
	if (file == NULL && !system) {
		json_object *doc = json_object_new_object();
		int changed;

		if (doc == NULL || merge_device("(fragment)", doc, name, mod, 0, &changed) != 0) {
			json_object_put(doc);
			return cli_finish_stdout(CLI_EXIT_FAIL);
		}
		printf("%s\n", json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PRETTY |
							       JSON_C_TO_STRING_SPACED |
							       JSON_C_TO_STRING_NOSLASHESCAPE));
		json_object_put(doc);
		return cli_finish_stdout(CLI_EXIT_OK);
	}
	return cli_finish_stdout(update_one(file != NULL ? file : FF_SYSTEM_POLICY, name, mod, remove,
					    dry_run));
}
