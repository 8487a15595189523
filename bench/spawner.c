/* Many idle processes for the benches, cheaply: `spawner GROUPS PER_GROUP [TAG]` starts GROUPS process
 * groups (each a session of its own) of PER_GROUP paused processes, prints each leader's pid and then
 * "up", and pauses. Every child dies with its parent (PR_SET_PDEATHSIG), so killing the spawner ends
 * them all. A forked C process costs a few private pages, where an idle Python costs megabytes. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

static void child(pid_t parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(0); /* the parent died before the prctl */
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: spawner GROUPS PER_GROUP [TAG]\n");
        return 2;
    }
    int groups = atoi(argv[1]), per = atoi(argv[2]);
    pid_t self = getpid();
    for (int g = 0; g < groups; g++) {
        int ready[2];
        if (pipe(ready) != 0) return 1;
        pid_t leader = fork();
        if (leader < 0) return 1;
        if (leader == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != self) _exit(0);
            setsid();
            pid_t me = getpid();
            for (int i = 1; i < per; i++) {
                pid_t c = fork();
                if (c == 0) child(me);
                if (c < 0) _exit(1);
            }
            char ok = 1;
            if (write(ready[1], &ok, 1) != 1) _exit(1);
            for (;;) pause();
        }
        close(ready[1]);
        char ok;
        if (read(ready[0], &ok, 1) != 1) return 1;
        close(ready[0]);
        printf("%d\n", (int)leader);
    }
    printf("up\n");
    fflush(stdout);
    for (;;) pause();
}
