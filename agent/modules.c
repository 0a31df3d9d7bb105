#include "config.h"
#include "modules.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <p11-kit/p11-kit.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int
modules_is_forbidden(const char *path)
{
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	return strncmp(base, "p11agent-pkcs11", 15) == 0;
}

static int
is_trust_only(CK_FUNCTION_LIST *m, const char *file)
{
	const char *base = strrchr(file, '/');
	base = base ? base + 1 : file;
	if (strcmp(base, "p11-kit-trust.so") == 0)
		return 1;
	char *tp = p11_kit_config_option(m, "trust-policy");
	int yes = tp && (strcmp(tp, "yes") == 0 || strcmp(tp, "true") == 0);
	free(tp);
	return yes;
}

/*
 * Child side: loads the registry (which dlopens modules, so vendor
 * constructors run here and not in the agent) and writes one line per
 * usable module: name TAB path TAB init-args NEWLINE.
 */
static void
discover_child(int wfd)
{
	FILE *out = fdopen(wfd, "w");
	if (!out)
		_exit(1);
	CK_FUNCTION_LIST **mods = p11_kit_modules_load(NULL, P11_KIT_MODULE_UNMANAGED);
	for (size_t i = 0; mods && mods[i]; i++) {
		char *file = p11_kit_module_get_filename(mods[i]);
		char *name = p11_kit_module_get_name(mods[i]);
		char *init = p11_kit_config_option(mods[i], "x-init-reserved");
		if (file && !is_trust_only(mods[i], file)) {
			char path[4096];
			if (file[0] == '/')
				snprintf(path, sizeof(path), "%s", file);
			else
				snprintf(path, sizeof(path), "%s/%s", P11_MODULE_PATH, file);
			if (!strpbrk(path, "\t\n") && !(name && strpbrk(name, "\t\n")) &&
			    !(init && strpbrk(init, "\t\n")))
				fprintf(out, "%s\t%s\t%s\n", name ? name : "", path,
					init && *init ? init : "");
		}
		free(file);
		free(name);
		free(init);
	}
	fflush(out);
	_exit(0);
}

int
modules_discover(struct agent_config *cfg)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC) != 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return -1;
	}
	if (pid == 0) {
		close(p[0]);
		discover_child(p[1]);
	}
	close(p[1]);
	FILE *in = fdopen(p[0], "r");
	if (!in) {
		close(p[0]);
		waitpid(pid, NULL, 0);
		return -1;
	}
	char line[8192];
	int added = 0;
	while (fgets(line, sizeof(line), in)) {
		line[strcspn(line, "\n")] = '\0';
		char *name = line;
		char *path = strchr(name, '\t');
		if (!path)
			continue;
		*path++ = '\0';
		char *init = strchr(path, '\t');
		if (!init)
			continue;
		*init++ = '\0';
		if (modules_is_forbidden(path)) {
			log_info("skipping module %s: p11agent's own front end", path);
			continue;
		}
		if (access(path, R_OK) != 0) {
			log_warn("skipping module %s: %s", path, strerror(errno));
			continue;
		}
		if (config_add_module(cfg, path, *name ? name : NULL, *init ? init : NULL) == 0)
			added++;
	}
	fclose(in);
	int st;
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	return added;
}
