/* The floor for a full sample: walk /proc and read stat and statm of every process, nothing else.

   cwalk [ROUNDS]         opens, reads and closes both files each round
   cwalk [ROUNDS] keep    keeps both descriptors of each process open and preads them each round
                          (what mem-exporter's reader does), closing those of processes gone
   cwalk ROUNDS MODE step waits for a line on stdin before each round (to interleave with another
                          measurement on a busy host); MODE is keep or open */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

static long pread_small(int fd, char *buf, size_t n) {
    long r = pread(fd, buf, n - 1, 0);
    if (r >= 0) buf[r] = 0;
    return r;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    int keep = argc > 2 && strcmp(argv[2], "keep") == 0;
    int step = argc > 3 && strcmp(argv[3], "step") == 0;
    struct rlimit lim; /* two descriptors a process: as many as the hard limit allows, as mem-exporter does */
    if (keep && getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    long pid_max = 4194304;
    FILE *f = fopen("/proc/sys/kernel/pid_max", "r");
    if (f) {
        if (fscanf(f, "%ld", &pid_max) != 1) pid_max = 4194304;
        fclose(f);
    }
    /* pid -> its two descriptors (0: none; kept ones are never 0) and the round it was last listed */
    int *stat_fd = keep ? calloc(pid_max + 1, sizeof(int)) : NULL;
    int *statm_fd = keep ? calloc(pid_max + 1, sizeof(int)) : NULL;
    int *seen = keep ? calloc(pid_max + 1, sizeof(int)) : NULL;
    long *kept = keep ? calloc(pid_max + 1, sizeof(long)) : NULL;
    long nkept = 0;
    char path[300], buf[4096];
    for (int round = 1; round <= rounds; round++) {
        if (step && !fgets(buf, sizeof buf, stdin)) break;
        struct timespec a, b, ca, cb;
        clock_gettime(CLOCK_MONOTONIC, &a);
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ca);
        DIR *d = opendir("/proc");
        struct dirent *e;
        long procs = 0, pages = 0;
        while ((e = readdir(d))) {
            if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
            long r;
            if (keep) {
                long pid = atol(e->d_name);
                if (pid <= 0 || pid > pid_max) continue;
                if (!stat_fd[pid]) {
                    snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
                    int s = open(path, O_RDONLY);
                    snprintf(path, sizeof path, "/proc/%s/statm", e->d_name);
                    int m = s < 0 ? -1 : open(path, O_RDONLY);
                    if (m < 0) {
                        if (s >= 0) close(s);
                        continue;
                    }
                    stat_fd[pid] = s, statm_fd[pid] = m, kept[nkept++] = pid;
                }
                seen[pid] = round;
                if (pread_small(stat_fd[pid], buf, sizeof buf) <= 0) continue;
                r = pread_small(statm_fd[pid], buf, sizeof buf);
            } else {
                snprintf(path, sizeof path, "/proc/%s/stat", e->d_name);
                if (read_small(path, buf, sizeof buf) <= 0) continue;
                snprintf(path, sizeof path, "/proc/%s/statm", e->d_name);
                r = read_small(path, buf, sizeof buf);
            }
            if (r <= 0) continue;
            long size, resident;
            if (sscanf(buf, "%ld %ld", &size, &resident) == 2) pages += resident;
            procs++;
        }
        closedir(d);
        if (keep) { /* forget the processes not listed this round */
            long j = 0;
            for (long i = 0; i < nkept; i++) {
                long pid = kept[i];
                if (seen[pid] == round) {
                    kept[j++] = pid;
                } else {
                    close(stat_fd[pid]), close(statm_fd[pid]);
                    stat_fd[pid] = statm_fd[pid] = 0;
                }
            }
            nkept = j;
        }
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cb);
        clock_gettime(CLOCK_MONOTONIC, &b);
        /* wall ms, processes, resident pages, CPU ms (user + system: the same on a busy host) */
        printf("%.3f %ld %ld %.3f\n", (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6, procs, pages,
               (cb.tv_sec - ca.tv_sec) * 1e3 + (cb.tv_nsec - ca.tv_nsec) / 1e6);
        fflush(stdout);
    }
    return 0;
}
