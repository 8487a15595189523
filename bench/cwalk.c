/* The floor for a full sample: walk /proc and read stat and statm of every process, nothing else. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long read_small(const char *path, char *buf, size_t n) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    long r = read(fd, buf, n - 1);
    close(fd);
    if (r >= 0) buf[r] = 0;
    return r;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    char path[64], buf[4096];
    for (int round = 0; round < rounds; round++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        DIR *d = opendir("/proc");
        struct dirent *e;
        long procs = 0, pages = 0;
        while ((e = readdir(d))) {
            if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
            snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
            if (read_small(path, buf, sizeof buf) <= 0) continue;
            snprintf(path, sizeof path, "/proc/%s/statm", e->d_name);
            if (read_small(path, buf, sizeof buf) <= 0) continue;
            long size, resident;
            if (sscanf(buf, "%ld %ld", &size, &resident) == 2) pages += resident;
            procs++;
        }
        closedir(d);
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%.3f %ld %ld\n", (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6, procs, pages);
    }
    return 0;
}
