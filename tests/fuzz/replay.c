/*
 * Replays a fuzz target's corpus without libFuzzer, so `make check` runs
 * every target on its committed seeds (and on any crash reproducer added
 * to the corpus).  TAP on stdout: one line per input.
 *
 *   replay [DIR|FILE]...     default: the target's corpus in the source tree
 */
#include "config.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int count;

static int
replay_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	uint8_t *buf = NULL;
	long n;

	if (!f || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 ||
	    !(buf = malloc((size_t)n + 1)) || fread(buf, 1, (size_t)n, f) != (size_t)n) {
		printf("not ok %d - read %s\n", ++count, path);
		if (f)
			fclose(f);
		free(buf);
		return 1;
	}
	fclose(f);
	fflush(stdout);
	LLVMFuzzerTestOneInput(buf, (size_t)n);
	free(buf);
	printf("ok %d - %s (%ld bytes)\n", ++count, path, n);
	return 0;
}

static int
name_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int
replay_path(const char *path)
{
	struct stat st;
	DIR *d;
	struct dirent *e;
	char **names = NULL;
	size_t n = 0, cap = 0;
	int bad = 0;

	if (stat(path, &st) != 0) {
		printf("not ok %d - %s exists\n", ++count, path);
		return 1;
	}
	if (!S_ISDIR(st.st_mode))
		return replay_file(path);
	if (!(d = opendir(path)))
		return 1;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			if (!(names = realloc(names, cap * sizeof(*names))))
				abort();
		}
		size_t l = strlen(path) + strlen(e->d_name) + 2;
		if (!(names[n] = malloc(l)))
			abort();
		snprintf(names[n++], l, "%s/%s", path, e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof(*names), name_cmp);
	for (size_t i = 0; i < n; i++) {
		bad |= replay_file(names[i]);
		free(names[i]);
	}
	free(names);
	return bad;
}

int
main(int argc, char **argv)
{
	int bad = 0;

	if (LLVMFuzzerInitialize)
		LLVMFuzzerInitialize(&argc, &argv);
	if (argc > 1) {
		for (int i = 1; i < argc; i++)
			bad |= replay_path(argv[i]);
	} else {
		bad |= replay_path(FUZZ_CORPUS);
	}
	if (count == 0) {
		printf("not ok 1 - the corpus holds inputs\n");
		count = 1;
		bad = 1;
	}
	printf("1..%d\n", count);
	return bad;
}
