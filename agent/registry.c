/* p11-kit's module registry (pkcs11.conf(5)), read without loading any module. */
#include "config.h"
#include "registry.h"
#include "log.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/stat.h>
#include <unistd.h>

/* The name enable-in and disable-in are matched against. */
#define PROGNAME "p11agentd"

enum {
	K_MODULE, K_REMOTE, K_ENABLE_IN, K_DISABLE_IN, K_TRUST_POLICY, K_INIT_RESERVED,
	K_PRIORITY, K_USER_CONFIG, NKEYS
};
static const char *const key_names[NKEYS] = {
	"module", "remote", "enable-in", "disable-in", "trust-policy", "x-init-reserved",
	"priority", "user-config"
};

/* The keys of one file, or of one module merged over several files. */
struct kv {
	char *v[NKEYS];
};

struct entry {
	char *name;
	char *file;                  /* the file the module: (or remote:) line came from */
	struct kv kv;
};

struct list {
	struct entry *e;
	size_t n;
};

static void
kv_clear(struct kv *kv)
{
	for (int k = 0; k < NKEYS; k++)
		free(kv->v[k]);
	memset(kv, 0, sizeof(*kv));
}

/*
 * Reads "name: value" lines into a fresh kv, then fills the keys of *kv
 * that are still unset (a file read earlier wins, as p11-kit merges).
 * 0 read, 1 missing (or not ours to read and ignore_denied), -1 bad or
 * unreadable (logged).
 */
static int
kv_read(const char *file, struct kv *kv, int ignore_denied)
{
	FILE *f = fopen(file, "re");
	if (!f) {
		if (errno == ENOENT || errno == ENOTDIR ||
		    (ignore_denied && (errno == EACCES || errno == EPERM)))
			return 1;
		log_warn("p11-kit registry: %s: %s; ignoring it", file, strerror(errno));
		return -1;
	}
	struct kv tmp;
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;
	int lineno = 0, rc = 0;

	memset(&tmp, 0, sizeof(tmp));
	while ((len = getline(&line, &cap, f)) >= 0) {
		char *s = line, *e = line + strnlen(line, (size_t)len);
		lineno++;
		while (s < e && isspace((unsigned char)*s))
			s++;
		while (e > s && isspace((unsigned char)e[-1]))
			e--;
		if (s == e || *s == '#')
			continue;
		char *colon = memchr(s, ':', (size_t)(e - s));
		if (*s == '[' || !colon) {
			log_warn("p11-kit registry: %s:%d: not a 'name: value' line; ignoring the file",
				 file, lineno);
			rc = -1;
			break;
		}
		char *ne = colon, *v = colon + 1;
		while (ne > s && isspace((unsigned char)ne[-1]))
			ne--;
		while (v < e && isspace((unsigned char)*v))
			v++;
		for (int k = 0; k < NKEYS; k++) {
			if ((size_t)(ne - s) != strlen(key_names[k]) ||
			    memcmp(s, key_names[k], (size_t)(ne - s)) != 0)
				continue;
			free(tmp.v[k]);
			if (!(tmp.v[k] = strndup(v, (size_t)(e - v)))) {
				rc = -1;
				log_err("out of memory");
			}
			break;
		}
		if (rc)
			break;
	}
	free(line);
	fclose(f);
	if (rc) {
		kv_clear(&tmp);
		return -1;
	}
	for (int k = 0; k < NKEYS; k++) {
		if (!kv->v[k]) {
			kv->v[k] = tmp.v[k];
			tmp.v[k] = NULL;
		}
	}
	kv_clear(&tmp);
	return 0;
}

/* "name.module" with p11-kit's characters gives "name"; anything else NULL. */
static char *
name_from_file(const char *fname)
{
	size_t n = strlen(fname), suffix = strlen(".module");

	if (n <= suffix || strcmp(fname + n - suffix, ".module") != 0 ||
	    !isalnum((unsigned char)fname[0]))
		return NULL;
	for (const char *c = fname; *c; c++)
		if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-' && *c != '.')
			return NULL;
	return strndup(fname, n - suffix);
}

static int
dir_read(const char *dir, struct list *l, int ignore_denied)
{
	DIR *d = opendir(dir);
	struct dirent *de;

	if (!d) {
		if (errno != ENOENT && errno != ENOTDIR &&
		    !(ignore_denied && (errno == EACCES || errno == EPERM)))
			log_warn("p11-kit registry: %s: %s; ignoring it", dir, strerror(errno));
		return 0;
	}
	while ((de = readdir(d)) != NULL) {
		char path[PATH_MAX];
		struct stat st;
		char *name = name_from_file(de->d_name);

		if (!name) {
			if (de->d_name[0] != '.')
				log_debug("p11-kit registry: %s/%s: not NAME.module; ignored", dir,
					  de->d_name);
			continue;
		}
		if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, de->d_name) >= sizeof(path) ||
		    stat(path, &st) != 0 || S_ISDIR(st.st_mode)) {
			free(name);
			continue;
		}
		size_t i;
		for (i = 0; i < l->n; i++)
			if (strcmp(l->e[i].name, name) == 0)
				break;
		if (i == l->n) {
			struct entry *ne = realloc(l->e, (l->n + 1) * sizeof(*ne));
			if (!ne) {
				free(name);
				closedir(d);
				return -1;
			}
			l->e = ne;
			memset(&ne[i], 0, sizeof(ne[i]));
			ne[i].name = name;
			l->n++;
		} else {
			free(name);
		}
		struct entry *e = &l->e[i];
		int had = e->kv.v[K_MODULE] || e->kv.v[K_REMOTE];
		if (kv_read(path, &e->kv, ignore_denied) == 0 && !had &&
		    (e->kv.v[K_MODULE] || e->kv.v[K_REMOTE])) {
			free(e->file);
			if (!(e->file = strdup(path))) {
				closedir(d);
				return -1;
			}
		}
		if (!e->file && !(e->file = strdup(path))) {
			closedir(d);
			return -1;
		}
	}
	closedir(d);
	return 0;
}

/* enable-in / disable-in: names separated by commas or white space. */
static int
in_list(const char *list, const char *word)
{
	size_t wl = strlen(word);

	for (const char *p = list; *p;) {
		while (*p == ',' || isspace((unsigned char)*p))
			p++;
		const char *q = p;
		while (*q && *q != ',' && !isspace((unsigned char)*q))
			q++;
		if ((size_t)(q - p) == wl && memcmp(p, word, wl) == 0)
			return 1;
		p = q;
	}
	return 0;
}

enum { USER_NONE, USER_MERGE, USER_ONLY };

/* p11-kit's user-config mode: the system pkcs11.conf's, which the user's may change. */
static int
user_mode(void)
{
	struct kv sys, usr;
	char path[PATH_MAX];
	const char *home = getenv("HOME"), *v;
	int mode = USER_MERGE;

	/* p11-kit reads no user configuration as root or in a setuid program. */
	if (getuid() == 0 || getauxval(AT_SECURE))
		return USER_NONE;
	memset(&sys, 0, sizeof(sys));
	memset(&usr, 0, sizeof(usr));
	(void)kv_read(P11_SYSTEM_CONFIG, &sys, 0);
	for (int i = 0; i < 2; i++) {
		v = (i == 0 ? sys : usr).v[K_USER_CONFIG];
		if (v && strcmp(v, "none") == 0)
			mode = USER_NONE;
		else if (v && (strcmp(v, "only") == 0 || strcmp(v, "override") == 0))
			mode = USER_ONLY;
		else if (v && strcmp(v, "merge") == 0)
			mode = USER_MERGE;
		if (i == 0 && mode != USER_NONE && home && home[0] == '/' &&
		    (size_t)snprintf(path, sizeof(path), "%s/.config/pkcs11/pkcs11.conf", home) <
		    sizeof(path))
			(void)kv_read(path, &usr, 1);
	}
	kv_clear(&sys);
	kv_clear(&usr);
	return mode;
}

static int
by_priority(const void *a, const void *b)
{
	const struct registry_module *x = a, *y = b;

	if (x->priority != y->priority)
		return x->priority > y->priority ? -1 : 1;
	return strcmp(x->name, y->name);
}

void
registry_free(struct registry_module *mods, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(mods[i].name);
		free(mods[i].file);
		free(mods[i].path);
		free(mods[i].init_args);
	}
	free(mods);
}

int
registry_read(struct registry_module **out, size_t *n)
{
	struct list l = { NULL, 0 };
	struct registry_module *r = NULL;
	int rc = -1, mode = user_mode();

	*out = NULL;
	*n = 0;
	if (mode != USER_NONE) {
		const char *home = getenv("HOME");
		char dir[PATH_MAX];
		if (!home || home[0] != '/') {
			struct passwd *pw = getpwuid(getuid());
			home = pw ? pw->pw_dir : NULL;
		}
		if (home && (size_t)snprintf(dir, sizeof(dir), "%s/.config/pkcs11/modules", home) <
		    sizeof(dir) && dir_read(dir, &l, 1) != 0)
			goto out;
	}
	if (mode != USER_ONLY && (dir_read(P11_SYSTEM_MODULES, &l, 0) != 0 ||
		      dir_read(P11_PACKAGE_MODULES, &l, 0) != 0))
		goto out;
	if (l.n && !(r = calloc(l.n, sizeof(*r))))
		goto out;
	for (size_t i = 0; i < l.n; i++) {
		struct entry *e = &l.e[i];
		struct registry_module *m = &r[i];
		const char *mod = e->kv.v[K_MODULE];

		m->name = e->name;
		e->name = NULL;
		m->file = e->file;
		e->file = NULL;
		m->remote = e->kv.v[K_REMOTE] != NULL;
		if (mod && !m->remote) {
			char path[PATH_MAX];
			int len = mod[0] == '/' ? snprintf(path, sizeof(path), "%s", mod) :
			    snprintf(path, sizeof(path), "%s/%s", P11_MODULE_PATH, mod);
			if (len > 0 && (size_t)len < sizeof(path) && !(m->path = strdup(path)))
				goto out;
		}
		if (e->kv.v[K_INIT_RESERVED] && *e->kv.v[K_INIT_RESERVED]) {
			m->init_args = e->kv.v[K_INIT_RESERVED];
			e->kv.v[K_INIT_RESERVED] = NULL;
		}
		m->priority = e->kv.v[K_PRIORITY] ? atoi(e->kv.v[K_PRIORITY]) : 0;
		m->trust_policy = e->kv.v[K_TRUST_POLICY] &&
		    strcmp(e->kv.v[K_TRUST_POLICY], "yes") == 0;
		if (e->kv.v[K_ENABLE_IN])
			m->disabled = !in_list(e->kv.v[K_ENABLE_IN], PROGNAME);
		else if (e->kv.v[K_DISABLE_IN])
			m->disabled = in_list(e->kv.v[K_DISABLE_IN], PROGNAME);
	}
	if (l.n)
		qsort(r, l.n, sizeof(*r), by_priority);
	*out = r;
	*n = l.n;
	r = NULL;
	rc = 0;
out:
	if (r)
		registry_free(r, l.n);
	for (size_t i = 0; i < l.n; i++) {
		free(l.e[i].name);
		free(l.e[i].file);
		kv_clear(&l.e[i].kv);
	}
	free(l.e);
	if (rc)
		log_err("out of memory reading the p11-kit registry");
	return rc;
}
